"""Host crop cutting + device resampling against Pillow's resize, and the buffer bound."""

from __future__ import annotations

import io
import math

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from clipjax.data import resize, transforms

PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
               "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour plus sharp edges and noise: every filter's overshoot and support matter."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    arr = np.asarray(base, np.float32) + rng.normal(0, 20, (height, width, 3))
    arr[height // 3: height // 2, width // 4: width // 2] = (250, 10, 10)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def device_resize(fields: list[dict], opts: transforms.ImageOptions) -> np.ndarray:
    batch = transforms.batch_regions(fields, opts.buffer_size)
    out = resize.crop_resize(batch["image"], batch["image_box"], batch["image_hw"], opts.image_size,
                             opts.interpolation)
    return np.asarray(out, np.float64)


def pillow_resize(img: Image.Image, box, opts: transforms.ImageOptions) -> np.ndarray:
    size = (opts.image_size, opts.image_size)
    return np.asarray(img.resize(size, PIL_FILTERS[opts.interpolation], box=box), np.float64)


@pytest.mark.parametrize("interpolation", list(PIL_FILTERS))
@pytest.mark.parametrize("size", [24, 64])
def test_device_resize_matches_pillow(interpolation, size):
    # Decoded sizes the draft bound allows: from upsampling (~0.8x) to downscaling by ~2.
    opts = transforms.ImageOptions(image_size=size, interpolation=interpolation)
    rng = np.random.default_rng(1)
    imgs, boxes = [], []
    for i, (w, h) in enumerate([(size, size), (int(1.3 * size), size), (2 * size, int(1.6 * size)),
                                (int(1.5 * size), 2 * size)]):
        img = photo(w, h, seed=i)
        for _ in range(3):
            imgs.append(img)
            boxes.append(transforms.random_crop_box(rng, w, h, (0.3, 1.0), (3 / 4, 4 / 3)))
        imgs.append(img)
        boxes.append(transforms.centre_crop_box(w, h))
    fields = [transforms.cut_region(img, box, opts) for img, box in zip(imgs, boxes)]
    assert all(transforms.region_bounds(img.width, img.height, box, opts)[4] == 1 for img, box in zip(imgs, boxes))
    got = device_resize(fields, opts)
    want = np.stack([pillow_resize(img, box, opts) for img, box in zip(imgs, boxes)])
    diff = np.abs(got - want)
    if interpolation == "nearest":
        np.testing.assert_array_equal(got, want)
    else:
        # Pillow rounds to uint8 between its two passes and at the end; we stay in float.
        assert diff.max() <= 2.0 and diff.mean() <= 0.4, (diff.max(), diff.mean())
    assert got.min() >= 0 and got.max() <= 255


@pytest.mark.parametrize("interpolation", ["bicubic", "lanczos"])
def test_cut_region_keeps_every_tap_the_filter_reads(interpolation):
    # The shipped region (box plus margin) must give exactly what the whole image gives.
    opts = transforms.ImageOptions(image_size=16, interpolation=interpolation)
    img = photo(40, 30)
    assert max(img.size) <= opts.buffer_size
    whole = np.asarray(img)
    rng = np.random.default_rng(0)
    boxes = [transforms.random_crop_box(rng, 40, 30, (0.2, 1.0), (3 / 4, 4 / 3)) for _ in range(12)]
    cut = [transforms.cut_region(img, box, opts) for box in boxes]
    uncut = [{"pixels": whole, "image_box": np.asarray([t, l, b, r], np.float32), "image_hw": np.asarray([30, 40])}
             for l, t, r, b in boxes]
    np.testing.assert_allclose(device_resize(cut, opts), device_resize(uncut, opts), atol=2e-3)
    assert any(f["image_hw"][0] < 30 for f in cut)  # the regions really were cut


@pytest.mark.parametrize("image_size", [32, 224, 384])
@pytest.mark.parametrize("interpolation", ["bicubic", "lanczos", "bilinear"])
def test_buffer_holds_every_draft_decoded_crop(image_size, interpolation):
    opts = transforms.ImageOptions(image_size=image_size, interpolation=interpolation)
    d = opts.draft_size
    rng = np.random.default_rng(0)
    # Draft decoding leaves the shorter side <= 2 * d (see ImageOptions.buffer_size).
    for _ in range(400):
        short = int(rng.integers(8, 2 * d + 1))
        long = int(short * math.exp(rng.uniform(0, math.log(6))))
        w, h = (long, short) if rng.random() < 0.5 else (short, long)
        for box in (transforms.random_crop_box(rng, w, h, opts.crop_scale, opts.crop_ratio),
                    transforms.centre_crop_box(w, h)):
            x0, y0, x1, y1, k = transforms.region_bounds(w, h, box, opts)
            assert k == 1, (w, h, box, opts.buffer_size)


def test_worst_case_jpeg_travels_unreduced_and_matches_pillow():
    opts = transforms.ImageOptions(image_size=64, interpolation="bicubic")
    d = opts.draft_size
    # 4:3 with the shorter side just under 4 * d: decoded at 1/2 to the largest allowed size.
    h = 4 * d - 1
    src = photo(h * 4 // 3, h)
    buf = io.BytesIO()
    src.save(buf, format="JPEG", quality=95)
    rng = np.random.default_rng(3)
    fields = transforms.train_image(buf.getvalue(), rng, opts)
    decoded = transforms.to_rgb(buf.getvalue(), opts.draft_size)
    assert min(decoded.size) == math.ceil(h / 2)
    top, left, bottom, right = (float(v) for v in fields["image_box"])
    assert bottom - top >= 0.9 * min(decoded.size) * math.sqrt(0.9) * 0.85  # crop at decoded scale: no reduction
    rng = np.random.default_rng(3)
    box = transforms.random_crop_box(rng, decoded.width, decoded.height, opts.crop_scale, opts.crop_ratio)
    got = device_resize([fields], opts)[0]
    diff = np.abs(got - pillow_resize(decoded, box, opts))
    assert diff.max() <= 2.0 and diff.mean() <= 0.4


def test_oversized_region_is_box_reduced_on_the_host():
    opts = transforms.ImageOptions(image_size=16)  # a PNG is never draft-decoded
    img = photo(300, 200)
    box = transforms.centre_crop_box(300, 200)
    assert transforms.region_bounds(300, 200, box, opts)[4] > 1
    fields = transforms.cut_region(img, box, opts)
    assert max(fields["image_hw"]) <= opts.buffer_size
    diff = np.abs(device_resize([fields], opts)[0] - pillow_resize(img, box, opts))
    assert diff.mean() <= 2.0  # a box pre-filter, then the same bicubic: close, not identical


def test_model_images_normalise_and_poison_bad_boxes():
    p = 8
    grey = np.full((2, p, p, 3), 0, np.uint8)
    grey[:] = np.round(255 * np.asarray(resize.OPENAI_MEAN)).astype(np.uint8)
    box = np.asarray([[0, 0, p, p], [0, 0, np.nan, p]], np.float32)
    out = np.asarray(resize.model_images({"image": jnp.asarray(grey), "image_box": jnp.asarray(box),
                                          "image_hw": jnp.full((2, 2), p, jnp.int32)}, 4))
    want = (np.round(255 * np.asarray(resize.OPENAI_MEAN)) / 255 - np.asarray(resize.OPENAI_MEAN)) / np.asarray(
        resize.OPENAI_STD)
    np.testing.assert_allclose(out[0], np.broadcast_to(want, (4, 4, 3)), atol=1e-5)
    assert np.isnan(out[1]).all()
