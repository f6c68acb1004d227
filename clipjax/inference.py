"""Use a trained model: ``clipjax.load(path)`` -> ``Model`` with ``encode_images``, ``encode_texts``, ``zero_shot``.

    model = clipjax.load("runs/mine")                       # a clipjax run folder (latest step)
    model = clipjax.load("ViT-B-32.safetensors", model="ViT-B-32")   # OpenCLIP weights
    z_NE = model.encode_images(["cat.jpg", "dog.png"])      # paths, bytes, PIL images or uint8 arrays
    z_ME = model.encode_texts(["a photo of a cat"])
    result = model.zero_shot(images, ["cat", "dog"], templates="openai")
    result.labels                                           # predicted class name per image

Images go through the run's evaluation preprocessing (``config.data``: eval crop,
interpolation, draft decoding) and texts through its tokenizer, exactly as ``clipjax-eval``
sees them. Embeddings are L2-normalised float32 numpy arrays. Batches are jitted once per
model and split over every local device (weights replicated); the last batch is padded,
so any number of inputs runs one compiled program.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import linen as nn

from clipjax import sharding
from clipjax.data import images as images_lib
from clipjax.data import transforms
from clipjax.errors import UserError
from clipjax.evals import classnames as classnames_lib
from clipjax.evals import zeroshot as zeroshot_lib
from clipjax.evals.encoders import Encoders, put_global, to_host
from clipjax.interop.weights import Saved, load_saved

Image = Any  # a path, encoded bytes, a PIL image or a uint8 [H, W(, C)] array


@dataclasses.dataclass
class ZeroShot:
    """Zero-shot predictions for ``N`` images over ``C`` classes."""

    classnames: list[str]
    scores: np.ndarray  # [N, C] cosine similarity of each image with each class embedding
    probs: np.ndarray  # [N, C] the model's probabilities: softmax (CLIP) or sigmoid (SigLIP) of its logits

    @property
    def index(self) -> np.ndarray:
        """[N] predicted class index (the highest score)."""
        return np.argmax(self.scores, axis=1)

    @property
    def labels(self) -> list[str]:
        """The predicted class name of each image."""
        return [self.classnames[i] for i in self.index]


def _image_input(image: Image) -> bytes | np.ndarray:
    """What ``transforms.eval_image`` takes: encoded bytes or a uint8 array."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    if isinstance(image, (bytes, bytearray, memoryview, np.ndarray)):
        return image
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"))
    raise TypeError(f"image: expected a path, bytes, a PIL image or a uint8 array, got {type(image).__name__}")


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class Model:
    """A saved model on this process's devices: embeddings and zero-shot classification."""

    def __init__(self, saved: Saved, *, batch_size: int = 64, devices: Sequence[jax.Device] | None = None,
                 decode_threads: int | None = None):
        from clipjax.data.tokenizer import get_tokenizer
        from clipjax.models import build_model

        self.config, self.step = saved.config, saved.step
        m = self.config.model
        devices = list(devices if devices is not None else jax.local_devices())
        self.mesh = sharding.make_mesh({"data": len(devices), "fsdp": 1, "tensor": 1}, devices=devices)
        self._rules = sharding.rules_from_config(self.config.sharding.rules)
        self.batch_size = -(-int(batch_size) // len(devices)) * len(devices)
        self._encoders = Encoders(build_model(m), m, self.config.data.interpolation)
        self.params = jax.device_put(saved.params, sharding.replicated(self.mesh))
        self.tokenizer = get_tokenizer(self.config.data.tokenizer, context_length=m.text.context_length,
                                       bpe_path=self.config.data.get("bpe_path") or None)
        self.image_options = transforms.ImageOptions.from_config(self.config.data, m.image.image_size)
        self._pool = concurrent.futures.ThreadPoolExecutor(decode_threads or min(8, os.cpu_count() or 1))

    # ------------------------------------------------------------------ host side

    def _crop(self, image: Image, where: str) -> dict[str, np.ndarray]:
        try:
            return transforms.eval_image(_image_input(image), self.image_options)
        except (images_lib.BadImage, OSError) as e:
            raise UserError(f"{where}: cannot read the image ({e})") from e

    def _run(self, fn: Callable, batch: Any, count: int) -> np.ndarray:
        """``fn(params, batch) -> [B, E]`` with ``batch`` (host arrays, B rows) split over the devices;
        the first ``count`` rows."""
        put = lambda x: put_global(x, sharding.batch_sharding(self.mesh, x.ndim))
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self._rules):
            out = fn(self.params, jax.tree.map(put, batch))
        return to_host(out)[:count]

    # ------------------------------------------------------------------ public

    def encode_images(self, images: Iterable[Image], *, names: Iterable[str] | None = None,
                      progress: Callable[[int], Any] | None = None) -> np.ndarray:
        """``[N, E]`` normalised embeddings of ``images`` (any iterable; decoded a batch at a time).

        ``names`` label the images in error messages (default: the path, else the index);
        ``progress(n)`` is called after each batch with the number of images it held.
        """
        images = list(images) if names is None else images
        names = names if names is not None else (str(x) if isinstance(x, (str, os.PathLike)) else f"image {i}"
                                                 for i, x in enumerate(images))
        out = []
        for chunk in _chunks(zip(images, names), self.batch_size):
            rows = list(self._pool.map(lambda pair: self._crop(*pair), chunk))
            rows += [transforms.empty_region()] * (self.batch_size - len(rows))
            fields = transforms.batch_regions(rows, self.image_options.buffer_size)
            out.append(self._run(self._encoders.image, fields, len(chunk)))
            if progress is not None:
                progress(len(chunk))
        return np.concatenate(out) if out else np.zeros((0, self.config.model.embed_dim), np.float32)

    def encode_texts(self, texts: Iterable[str], *, progress: Callable[[int], Any] | None = None) -> np.ndarray:
        """``[N, E]`` normalised embeddings of ``texts`` (tokenized with the run's tokenizer)."""
        out = []
        for chunk in _chunks(texts, self.batch_size):
            ids = np.asarray(self.tokenizer(chunk), np.int32)
            ids = np.concatenate([ids, np.zeros((self.batch_size - len(chunk), ids.shape[1]), np.int32)])
            out.append(self._run(self._encoders.text, ids, len(chunk)))
            if progress is not None:
                progress(len(chunk))
        return np.concatenate(out) if out else np.zeros((0, self.config.model.embed_dim), np.float32)

    def class_embeddings(self, classnames: Sequence[str], templates: str | Sequence[str] = "single") -> np.ndarray:
        """``[C, E]`` prompt-ensembled class embeddings, as ``clipjax-eval``'s zero-shot computes them.

        ``templates``: a list with one ``{}`` each, or a built-in name (``single``, ``short``,
        ``openai``) or file (see ``clipjax.evals.classnames``).
        """
        templates = classnames_lib.get_templates(templates)
        return zeroshot_lib.class_embeddings(
            lambda ids: self._run(self._encoders.text, ids, len(ids)), self.tokenizer, list(classnames), templates,
            batch_size=self.batch_size)

    def zero_shot(self, images: Iterable[Image], classnames: Sequence[str],
                  templates: str | Sequence[str] = "single", *, names: Iterable[str] | None = None,
                  progress: Callable[[int], Any] | None = None) -> ZeroShot:
        """Classifies ``images`` among ``classnames`` by cosine similarity with the class embeddings
        (``names``, ``progress``: as for ``encode_images``)."""
        zcls_CE = self.class_embeddings(classnames, templates)
        zimg_NE = self.encode_images(images, names=names, progress=progress)
        scores = np.einsum("ne,ce->nc", zimg_NE.astype(np.float64), zcls_CE.astype(np.float64))
        return ZeroShot(list(classnames), scores.astype(np.float32), self._probs(scores))

    def _probs(self, scores_NC: np.ndarray) -> np.ndarray:
        scale = float(np.exp(np.asarray(jax.device_get(self.params["logit_scale"]), np.float64)))
        logits = scale * scores_NC
        if "logit_bias" in self.params:
            return (1.0 / (1.0 + np.exp(-(logits + float(jax.device_get(self.params["logit_bias"])))))).astype(np.float32)
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def load(workdir_or_weights: str | os.PathLike, step: int | None = None, *, model: Any = None,
         batch_size: int = 64) -> Model:
    """A ``Model`` from a clipjax run folder (``step``: default the latest checkpoint) or a weights file
    another framework wrote (``model``: what its shapes cannot tell, e.g. an OpenCLIP model name).

    Formats: ``clipjax.interop.weights.IMPORTERS``.
    """
    return Model(load_saved(os.fspath(workdir_or_weights), step, model), batch_size=batch_size)
