"""The ``config.data`` section: where examples come from and how they are prepared.

Image size and context length are not here: they belong to the model
(``model.image.image_size``, ``model.text.context_length``) and are passed to
``make_train_iterator`` / ``make_eval_iterator`` as arguments.
"""

from __future__ import annotations

import ml_collections

from clipjax.data.resize import KERNELS
from clipjax.data.sources import SOURCES
from clipjax.data.tokenizer import check_spec
from clipjax.data.transforms import EVAL_CROPS

CAPTION_CHOICES = ("random", "first")


def synth_config() -> ml_collections.ConfigDict:
    """Defaults of the procedurally drawn dataset (``clipjax.data.synth``)."""
    return ml_collections.ConfigDict({
        "num_train": 20000,  # training images
        "num_heldout": 1000,  # held-out images (attribute combinations never seen in training)
        "image_size": 64,  # side of the square images, pixels
        "seed": 0,  # same seed -> byte-identical shards
        "num_train_shards": 4,  # ArrayRecord shards of the train split
        "jpeg_quality": 90,  # images are stored as JPEG
    })


def data_config() -> ml_collections.ConfigDict:
    """Every ``config.data`` field with its default."""
    return ml_collections.ConfigDict({
        # --- source ---
        "source": "synthetic",  # synthetic | arrayrecord | tfds
        # Folder of ArrayRecord shards (records.py format). For "synthetic" the dataset is
        # generated into it when missing; "" -> $CLIPJAX_DATA_DIR/synthetic or ~/.cache/clipjax/synthetic.
        "path": "",
        "train_split": "train",  # shard prefix (arrayrecord/synthetic) or TFDS split, e.g. "train[:90%]"
        "tfds_name": "",  # e.g. "cifar10" or "coco_captions:1.*" (source=tfds)
        "tfds_data_dir": "",  # TFDS data_dir; "" -> TFDS default (~/tensorflow_datasets)
        "image_key": "image",  # TFDS feature holding the image
        "text_key": "",  # TFDS feature holding the caption(s), "/" for nested (e.g. "captions/text")
        "label_key": "label",  # TFDS class-label feature; "" -> no labels (-1)
        # With no text_key, captions are made from the label's class name with this template.
        "label_caption_template": "a photo of a {}.",
        # --- text ---
        "tokenizer": "bytes",  # bytes | clip | sentencepiece:PATH | hf:PATH_OR_DIR (sets the model's vocab_size)
        "bpe_path": "",  # CLIP BPE vocabulary (tokenizer=clip); "" -> the tokenizer's default
        "caption_choice": "random",  # random | first: which caption of an example trains (train only)
        # --- image ---
        "crop_scale": (0.9, 1.0),  # random resized crop: area fraction range (train)
        "crop_ratio": (3 / 4, 4 / 3),  # random resized crop: aspect ratio range (train)
        "interpolation": "bicubic",  # resize filter (on the device): bicubic | bilinear | lanczos | nearest
        # JPEG draft mode: decode at 1/2, 1/4 or 1/8 scale when that still leaves the shorter
        # side >= draft_min_scale * image_size (much faster; slight upsampling when < 1).
        "draft_decode": True,
        "draft_min_scale": 0.8,  # 1.0 never upsamples; lower decodes faster
        # Eval crop: centre (the centred square) | openclip (OpenCLIP's validation transform:
        # its whole-pixel crop offsets, full decode; use it to score OpenCLIP/OpenAI weights).
        "eval_crop": "centre",
        # Derived by config.validate() from the fields above and the image size (any value set is replaced).
        "buffer_size": ml_collections.config_dict.placeholder(int),  # side P of the [P, P, 3] uint8 crop buffer
        # --- loading ---
        "num_workers": 4,  # grain worker processes per host; 0 = in the main process
        "prefetch": 2,  # batches prepared ahead (main-process thread; workers buffer as much)
        "shuffle": True,  # train: a fresh permutation of the whole dataset every epoch
        # Bad (undecodable) images are skipped and counted; training stops with an error when
        # skipped / seen exceeds this, once at least skip_check_after examples were seen.
        "max_skip_fraction": 0.01,
        "skip_check_after": 1000,
        "synth": synth_config(),  # the synthetic dataset (source=synthetic)
    })


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"config.data.{key}: {msg}")


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad ``config.data`` key."""
    if cfg.source not in SOURCES:
        _fail("source", f"{cfg.source!r} is not one of {SOURCES}")
    if cfg.source == "arrayrecord" and not cfg.path:
        _fail("path", "source=arrayrecord needs the folder of shards")
    if cfg.source == "tfds" and not cfg.tfds_name:
        _fail("tfds_name", "source=tfds needs a dataset name, e.g. 'cifar10'")
    if not cfg.train_split:
        _fail("train_split", "must be set")
    if cfg.source == "tfds" and not cfg.image_key:
        _fail("image_key", "must name the TFDS image feature")
    if cfg.source == "tfds" and not cfg.text_key and not cfg.label_key:
        _fail("text_key", "with source=tfds set text_key or label_key (captions come from class names)")
    if "{}" not in cfg.label_caption_template:
        _fail("label_caption_template", f"{cfg.label_caption_template!r} has no '{{}}' for the class name")
    if (why := check_spec(cfg.tokenizer)) is not None:
        _fail("tokenizer", why)
    if cfg.caption_choice not in CAPTION_CHOICES:
        _fail("caption_choice", f"{cfg.caption_choice!r} is not one of {CAPTION_CHOICES}")
    if cfg.get("eval_crop", "centre") not in EVAL_CROPS:
        _fail("eval_crop", f"{cfg.eval_crop!r} is not one of {EVAL_CROPS}")
    if cfg.interpolation not in KERNELS:
        _fail("interpolation", f"{cfg.interpolation!r} is not one of {tuple(KERNELS)}")
    lo, hi = (float(v) for v in cfg.crop_scale)
    if not 0.0 < lo <= hi <= 1.0:
        _fail("crop_scale", f"{tuple(cfg.crop_scale)} must satisfy 0 < low <= high <= 1")
    lo, hi = (float(v) for v in cfg.crop_ratio)
    if not 0.0 < lo <= hi:
        _fail("crop_ratio", f"{tuple(cfg.crop_ratio)} must satisfy 0 < low <= high")
    if not 0.0 < cfg.draft_min_scale <= 1.0:
        _fail("draft_min_scale", f"{cfg.draft_min_scale} must be in (0, 1]")
    if cfg.num_workers < 0:
        _fail("num_workers", f"{cfg.num_workers} must be >= 0")
    if cfg.prefetch < 0:
        _fail("prefetch", f"{cfg.prefetch} must be >= 0")
    if not 0.0 <= cfg.max_skip_fraction <= 1.0:
        _fail("max_skip_fraction", f"{cfg.max_skip_fraction} must be in [0, 1]")
    if cfg.skip_check_after < 1:
        _fail("skip_check_after", f"{cfg.skip_check_after} must be >= 1")
    s = cfg.synth
    for key in ("num_train", "num_heldout", "num_train_shards"):
        if s[key] < 1:
            _fail(f"synth.{key}", f"{s[key]} must be >= 1")
    if s.image_size < 32:
        _fail("synth.image_size", f"{s.image_size} must be >= 32 (shapes must stay recognisable)")
    if not 1 <= s.jpeg_quality <= 100:
        _fail("synth.jpeg_quality", f"{s.jpeg_quality} must be in [1, 100]")
