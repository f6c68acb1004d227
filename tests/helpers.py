"""Helpers shared by several test files (imported as ``helpers``: pytest puts tests/ on sys.path)."""

import io
import os
import pathlib
import tarfile

import grain
import matplotlib.cbook
import jax
import numpy as np
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from clipjax import checkpoint as ckpt_lib
from clipjax import sharding
from clipjax.config import base_config, load_config, validate
from clipjax.data import records
from clipjax.report import read_metrics
from clipjax.train_step import batch_spec, compile_train_step, init_state, make_setup

DEMO = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py")


# Train steps on a tiny model.

def tiny_config(batch=16, **overrides):
    c = base_config()
    c.model.size = "tiny"
    c.model.dtype = "float32"
    c.model.image.update(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64)
    c.model.text.update(width=32, depth=1, heads=2, mlp_dim=64, vocab_size=259, context_length=8)
    c.model.embed_dim = 16
    c.loss.impl = "dense"
    c.train.batch_size = batch
    c.train.steps = 10
    c.optim.warmup_steps = 1
    c.optim.lr = 1e-2
    c.update_from_flattened_dict(overrides)
    return c


def make_batch(c, seed):
    rng = np.random.default_rng(seed)
    b, t = c.train.batch_size, c.model.text.context_length
    p = batch_spec(validate(c))["image"][0][0]
    ids = rng.integers(1, c.model.text.vocab_size - 1, size=(b, t)).astype(np.int32)
    ids[:, -1] = c.model.text.vocab_size - 1
    top_left = rng.uniform(0, p / 4, size=(b, 2))
    box = np.concatenate([top_left, top_left + rng.uniform(p / 2, 3 * p / 4, size=(b, 2))], axis=1)
    return {"image": rng.integers(0, 256, size=(b, p, p, 3), dtype=np.uint8), "image_box": box.astype(np.float32),
            "image_hw": np.full((b, 2), p, np.int32), "text": ids}


def run_steps(c, batches, devices):
    validate(c, len(devices))
    mesh = sharding.mesh_from_config(c.mesh, devices)
    setup = make_setup(c, mesh)
    state = init_state(setup, c.seed)
    step = compile_train_step(setup)
    shardings = setup.batch_shardings()
    history = []
    for batch in batches:
        batch = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return state, history


def smoke(data_dir, *overrides, arg=""):
    spec = f"{DEMO}:smoke,data={data_dir}" + (f",{arg}" if arg else "")
    return load_config(spec, list(overrides))


# Images the converters and decoders meet.

def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w: int = 64, h: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 128)], -1).astype(np.uint8)


def sample_images() -> dict[str, bytes]:
    """One encoded image per case the converters must handle (all 64x48 unless noted)."""
    rgb = Image.fromarray(gradient())
    palette = Image.new("P", (64, 48), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(0, (0, 0, 32, 48))
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, 32:, 3] = 255  # left half transparent red -> white, right half opaque red
    g16 = (np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16)  # spans 0..64491
    return {
        "jpeg": encode(rgb, "JPEG", quality=95),
        "png": encode(rgb, "PNG"),
        "webp": encode(rgb, "WEBP", quality=90),
        "cmyk": encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "gray": encode(rgb.convert("L"), "JPEG", quality=95),
        "gray_alpha": encode(rgb.convert("LA"), "PNG"),
        "palette_transparent": encode(palette, "PNG", transparency=0),
        "rgba": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "gray16": encode(Image.fromarray(g16), "PNG"),
        "gif": encode(palette, "GIF"),
    }


def broken_images() -> dict[str, bytes]:
    good = sample_images()["jpeg"]
    rng = np.random.default_rng(0)
    return {
        "truncated": good[: len(good) // 2],
        "random": rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "empty": b"",
        "text": b"<html>not an image</html>",
        "header_only": good[:200],
    }


# Converter inputs and outputs.

def read_back(out_dir, split="train"):
    paths = records.shard_paths(str(out_dir), split)
    src = grain.sources.ArrayRecordDataSource(paths)
    return [records.decode(src[i]) for i in range(len(src))]


def make_csv_dataset(root):
    """15 distinct image paths: 9 usable (4 need re-encoding), 6 to skip for 4 reasons."""
    imgs = root / "imgs"
    imgs.mkdir()
    good, bad = sample_images(), broken_images()
    files = {"a.jpg": good["jpeg"], "b.png": good["png"], "c.webp": good["webp"], "d.jpg": good["cmyk"],
             "e.jpg": good["gray"], "f.png": good["palette_transparent"], "g.png": good["rgba"],
             "h.png": good["gray16"], "k.jpg": good["jpeg"], "n.jpg": good["jpeg"], "l.jpg": good["jpeg"],
             "t.jpg": bad["truncated"], "r.jpg": bad["random"], "z.jpg": b""}
    for name, data in files.items():
        (imgs / name).write_bytes(data)
    rows = [(f"imgs/{n}", f"caption of {n[0]}".encode()) for n in files if n[0] in "abcdefgh"]
    rows += [("imgs/a.jpg", b"second caption, with comma"),  # merged into a.jpg's example
             ("imgs/k.jpg", b"   "),  # empty after cleaning -> no_caption
             ("imgs/n.jpg", b"caf\xe9 latin-1"),  # not UTF-8 -> bad_caption
             ("imgs/l.jpg", ("long " * 20000).encode()),  # 100k chars -> cut
             ("imgs/t.jpg", b"truncated"), ("imgs/r.jpg", b"random bytes"), ("imgs/z.jpg", b"empty file"),
             (str(imgs / "m.jpg"), b"missing, absolute path")]
    lines = [b"filepath,title"] + [p.encode() + b',"' + c + b'"' for p, c in rows]
    (root / "data.csv").write_bytes(b"\n".join(lines) + b"\n")
    return root / "data.csv"


def add_member(tar, name, data, kind=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
        tar.addfile(info)
        return
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_tars(root):
    good, bad = sample_images(), broken_images()
    with tarfile.open(root / "00000.tar", "w") as tar:
        add_member(tar, "00000/000.jpg", good["jpeg"]), add_member(tar, "00000/000.txt", b"a red thing")
        add_member(tar, "00000/001.png", good["png"]), add_member(tar, "00000/001.json", b'{"caption": "from json", "url": "u"}')
        add_member(tar, "00000/002.webp", good["webp"]), add_member(tar, "00000/002.txt", b"txt wins")
        add_member(tar, "00000/002.json", b'{"caption": "json loses"}')
        add_member(tar, "00000/003.jpg", bad["truncated"]), add_member(tar, "00000/003.txt", b"broken image")
        add_member(tar, "00000/004.txt", b"caption without image")
        add_member(tar, "../evil.jpg", good["jpeg"]), add_member(tar, "/abs/evil.jpg", good["jpeg"])
        add_member(tar, "00000/../../escape.txt", b"x"), add_member(tar, "00000/link.jpg", b"", tarfile.SYMTYPE)
        add_member(tar, "00000/005.jpg", good["cmyk"]), add_member(tar, "00000/005.txt", b"\xff\xfe bad utf8")
    with tarfile.open(root / "00001.tar", "w") as tar:
        add_member(tar, "100.jpg", good["gray"]), add_member(tar, "100.txt", b"gray")
        add_member(tar, "101.png", good["gray16"]), add_member(tar, "101.txt", b"sixteen bit")
    return root


def losses_of(workdir):
    """step -> train/loss of a run's metrics.jsonl."""
    return {r["step"]: r["train/loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if "train/loss" in r}


def final_params(workdir):
    """The latest checkpoint's step and its params as host numpy arrays."""
    import orbax.checkpoint as ocp

    step = ckpt_lib.Checkpointer(workdir, every=1, keep=10).latest_step()
    state_dir = os.path.join(ckpt_lib.checkpoint_dir(workdir), str(step), "state")
    return step, ocp.StandardCheckpointer().restore(state_dir)["params"]


def run_in_process(main, argv, capsys):
    """Runs a command's main in this process: (exit status, stdout, stderr)."""
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err  # sys.exit(None) is status 0


def assert_one_line_error(code, err, prog, *hints):
    """Exit status 2 and one stderr line `PROG: error: ...` holding every hint."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    for hint in hints:
        assert hint in lines[0], (hint, lines[0])


class FakeBucket(MemoryFileSystem):
    """``gs://`` served from memory through fsspec, as gcsfs serves a real bucket to etils.epath."""

    protocol, root_marker = ("gs", "gcs"), ""
    store, pseudo_dirs = {}, [""]

    def __init__(self, *args, finalize_on_close=None, **kwargs):
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        return path.split("://", 1)[-1].rstrip("/")


def png(index: int, w: int = 20, h: int = 14) -> bytes:
    """A solid image whose colour encodes ``index`` (survives crop and resize exactly)."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (index % 256, index // 256, 77)).save(buf, format="PNG")
    return buf.getvalue()


def index_of(images: np.ndarray) -> np.ndarray:
    """Inverse of ``_png`` on [b, P, P, 3] uint8 crop buffers: the record index per row."""
    px = np.asarray(images)[:, 0, 0, :2].astype(int)  # the crop's pixels start top-left
    return px[:, 0] + 256 * px[:, 1]


def assert_same(xs: list[dict], ys: list[dict]) -> None:
    """Two lists of batches, equal key by key and bit by bit."""
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


def photo_framings():
    """A real photograph (shipped with matplotlib) in framings that exercise every rounding path."""
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with open(path, "rb") as f:
        jpeg = f.read()
    photo = Image.open(io.BytesIO(jpeg)).convert("RGB")  # 512 x 600: larger than the eval buffer's region
    framings = {"landscape": photo.crop((0, 100, 512, 403)), "odd": photo.crop((3, 7, 400, 318)),
                "small": photo.resize((150, 181), Image.BICUBIC), "square": photo.crop((40, 40, 300, 300))}
    out = {"jpeg": (jpeg, photo)}
    for name, im in framings.items():
        buf = io.BytesIO()
        im.save(buf, "PNG")  # lossless: both sides decode the same pixels
        out[name] = (buf.getvalue(), im)
    return out
