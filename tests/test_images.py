"""Image sanitising: every mode and broken input seen in crawls -> RGB or a BadImage with a reason."""

import io

import numpy as np
import pytest
from PIL import Image

from clipjax.data.images import BadImage, load_rgb, prepare
from helpers import broken_images, encode, gradient, sample_images


@pytest.mark.parametrize("name", list(sample_images()))
def test_every_mode_becomes_rgb(name):
    img = load_rgb(sample_images()[name])
    assert img.mode == "RGB" and img.size == (64, 48)


def test_colour_values():
    s = sample_images()
    ref = gradient().astype(int)
    for name in ("png", "jpeg", "cmyk", "webp"):
        got = np.asarray(load_rgb(s[name])).astype(int)
        assert np.abs(got - ref).mean() < 4, name
    rgba = np.asarray(load_rgb(s["rgba"]))
    assert (rgba[:, :32] == 255).all()  # transparent -> white
    assert (rgba[:, 32:] == [255, 0, 0]).all()
    pal = np.asarray(load_rgb(s["palette_transparent"]))
    assert (pal[:, :32] == 255).all() and (pal[:, 32:] == [0, 0, 255]).all()


def test_16bit_is_scaled_not_clipped():
    g16 = (np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16)
    got = np.asarray(load_rgb(sample_images()["gray16"]))[..., 0].astype(int)
    want = np.round(g16 / 257.0).astype(int)
    assert np.abs(got - want).max() <= 1
    assert got.max() > 240 and (got < 255).mean() > 0.9  # PIL's own convert would give mostly 255


def test_exif_orientation():
    img = Image.fromarray(gradient(64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    data = encode(img, "JPEG", exif=exif, quality=95)
    out = load_rgb(data)
    assert out.size == (48, 64)
    # draft size is given in displayed orientation
    big = encode(Image.fromarray(gradient(640, 480)), "JPEG", exif=exif)
    small = load_rgb(big, draft_size=(100, 100))
    assert small.size == (120, 160)  # 1/4 scale is the smallest covering 100x100


def test_draft_decode_downscales_jpeg_only():
    big = Image.fromarray(gradient(800, 600))
    assert load_rgb(encode(big, "JPEG"), draft_size=(100, 100)).size == (200, 150)
    assert load_rgb(encode(big, "JPEG"), draft_size=(600, 600)).size == (800, 600)
    assert load_rgb(encode(big, "PNG"), draft_size=(100, 100)).size == (800, 600)


@pytest.mark.parametrize("name", list(broken_images()))
def test_broken_bytes_raise_bad_image(name):
    with pytest.raises(BadImage) as e:
        load_rgb(broken_images()[name])
    assert str(e.value)


def test_decompression_bomb_rejected_before_decoding():
    data = encode(Image.new("L", (9000, 9000)), "PNG")  # 81 MP, a few kB compressed
    with pytest.raises(BadImage, match="too large"):
        load_rgb(data)


def test_excluded_formats():
    img = Image.fromarray(gradient())
    for fmt in ("PPM", "TGA"):
        with pytest.raises(BadImage, match="not an image"):
            load_rgb(encode(img, fmt))


def test_prepare_keeps_or_reencodes():
    s = sample_images()
    for name in ("jpeg", "png", "webp", "gray"):
        out, converted = prepare(s[name])
        assert out == s[name] and not converted, name
    for name in ("cmyk", "rgba", "gray16", "palette_transparent", "gif", "gray_alpha"):
        out, converted = prepare(s[name])
        assert converted and Image.open(io.BytesIO(out)).format == "JPEG", name
        assert load_rgb(out).size == (64, 48)
    big = encode(Image.fromarray(gradient(1000, 500)), "PNG")
    out = prepare(big, max_side=256)[0]
    img = Image.open(io.BytesIO(out))
    assert img.format == "JPEG" and img.size == (256, 128)
    assert prepare(s["jpeg"], max_side=64)[0] == s["jpeg"]
    with pytest.raises(BadImage):
        prepare(broken_images()["truncated"])
