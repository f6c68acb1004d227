"""The synthetic shapes dataset: determinism, split partition, labels, captions, idempotence."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from clipjax.data import cli as data_cli, records, synth

SMALL = {"num_train": 120, "num_heldout": 48, "image_size": 32, "seed": 0, "num_train_shards": 2, "jpeg_quality": 90}


def _read(folder: str, split: str) -> list[records.Example]:
    out = []
    for path in records.shard_paths(folder, split):
        reader = array_record_module.ArrayRecordReader(path)
        out += [records.decode(r) for r in reader.read_all()]
        reader.close()
    return out


def _tuple(ex: records.Example) -> tuple[str, str, str, str, str]:
    """(colour, shape, count, size, position) parsed back from the first caption."""
    head, rest = ex.captions[0].split(". ", 1)
    colour, shape = head.split(" ")
    count, size, _ones, position = rest.rstrip(".").split(" ", 3)
    return colour, shape, count, size, position


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("synth"))
    synth.ensure_synthetic(folder, SMALL)
    return folder


def _files(folder: str) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_same_seed_gives_identical_bytes(small, tmp_path):
    assert data_cli.main(["synth", "--out", str(tmp_path / "b")] + [f"--{k}={v}" for k, v in SMALL.items()]) == 0
    assert _files(small) == _files(str(tmp_path / "b"))
    other = synth.make_example(1, synth.SPLIT_TRAIN, 0, 32, 90)
    assert other.image != synth.make_example(0, synth.SPLIT_TRAIN, 0, 32, 90).image


def test_heldout_combinations_never_in_train(small):
    train = {_tuple(e) for e in _read(small, "train")}
    held = {_tuple(e) for e in _read(small, "heldout")}
    assert train and held and not train & held
    # the partition itself: every class has both train and held-out tuples
    for label in range(len(synth.CLASSES)):
        tuples = [(s, c, p) for s in synth.SIZES for c in synth.COUNTS for p in synth.POSITIONS]
        flags = [synth.is_heldout(label, *t) for t in tuples]
        assert 0 < sum(flags) < len(flags)
    assert len(synth.HELDOUT_COMBOS) == len(synth.CLASSES) * 6


def test_labels_match_classes_and_captions_lead_with_class_words(small):
    for split in ("train", "heldout"):
        exs = _read(small, split)
        assert len(exs) == SMALL[f"num_{split}"]
        for e in exs:
            name = synth.CLASSES[e.label]
            colour, shape = name.split(" ")
            assert len(e.captions) >= 3
            assert e.captions[0].startswith(name) and e.captions[1].startswith(name)
            assert all(colour in c and shape in c for c in e.captions)
            assert list(synth.COLOURS).index(colour) * len(synth.SHAPES) + synth.SHAPES.index(shape) == e.label
            assert synth.is_heldout(e.label, *[_tuple(e)[i] for i in (3, 2, 4)]) == (split == "heldout")
            img = Image.open(io.BytesIO(e.image))
            assert img.size == (32, 32) and img.format == "JPEG"


def test_images_show_the_colour(small):
    # the dominant non-background colour is the named one
    for e in _read(small, "heldout")[:20]:
        px = np.asarray(Image.open(io.BytesIO(e.image)).convert("RGB"), np.float32).reshape(-1, 3)
        sat = px.max(1) - px.min(1)
        colour = synth.CLASSES[e.label].split(" ")[0]
        if colour == "white":
            assert (px.min(1) > 200).sum() > 10
        else:
            fg = px[sat > 60]
            assert len(fg) > 10
            ref = np.asarray(list(synth.COLOURS.values()), np.float32)
            nearest = np.argmin(((fg.mean(0) - ref) ** 2).sum(1))
            assert list(synth.COLOURS)[nearest] == colour


def test_info_json_and_idempotence(small, tmp_path):
    info = json.load(open(os.path.join(small, synth.INFO_FILE)))
    assert info["classes"] == list(synth.CLASSES) and info["templates"] == list(synth.TEMPLATES)
    assert info["splits"]["heldout"]["num_examples"] == SMALL["num_heldout"]
    before = {n: os.stat(os.path.join(small, n)).st_mtime_ns for n in os.listdir(small)}
    assert synth.ensure_synthetic(small, SMALL) == info  # complete: nothing rewritten
    assert before == {n: os.stat(os.path.join(small, n)).st_mtime_ns for n in os.listdir(small)}
    with pytest.raises(synth.SynthMismatch, match=r"made with seed=0, not seed=1: give this config its own folder"):
        synth.ensure_synthetic(small, dict(SMALL, seed=1))
    # an interrupted run (no info.json, a stray temp shard) is redone
    part = str(tmp_path / "part")
    synth.ensure_synthetic(part, SMALL)
    os.remove(os.path.join(part, synth.INFO_FILE))
    open(os.path.join(part, "train-00000-of-00002.array_record.tmp"), "wb").close()
    synth.ensure_synthetic(part, SMALL)
    assert {k: v for k, v in _files(part).items() if not k.endswith(".tmp")} == _files(small)


def test_older_format_is_regenerated(small, tmp_path):
    old = str(tmp_path / "old")
    synth.ensure_synthetic(old, dict(SMALL, num_train_shards=3))
    info_path = os.path.join(old, synth.INFO_FILE)
    info = json.load(open(info_path))
    info["format_version"] = synth.FORMAT_VERSION - 1
    info["settings"] = dict(SMALL)  # even with today's settings, an older format is redrawn
    json.dump(info, open(info_path, "w"))
    assert synth.ensure_synthetic(old, SMALL)["format_version"] == synth.FORMAT_VERSION
    assert _files(old) == _files(small)  # the stale third shard is gone
