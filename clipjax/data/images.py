"""Image bytes -> clean 8-bit RGB, shared by the converters and the input pipeline.

``load_rgb`` accepts what web crawls contain (JPEG/MPO, PNG, WebP, GIF, BMP, TIFF;
CMYK, grayscale, palette, alpha, 16-bit; EXIF rotation) and raises one error
type, ``BadImage``, with a short reason for everything it cannot use.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps

__all__ = ["BadImage", "load_rgb", "prepare", "MAX_PIXELS", "FORMATS"]

# Formats PIL may open. An allow-list keeps PIL away from plugins that run external
# programs (EPS -> ghostscript) or parse exotic containers.
# (Multi-picture JPEGs from cameras open through "JPEG" and report format "MPO".)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Larger images are rejected before decoding (decompression bombs; no caption image needs more).
MAX_PIXELS = 64_000_000
_WHITE = (255, 255, 255)
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class BadImage(ValueError):
    """Image bytes that cannot be turned into an RGB image; ``str(e)`` is the reason."""


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Opens (header only) and checks the size; no pixel is decoded yet."""
    if not data:
        raise BadImage("empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # broken headers
        raise BadImage(f"corrupt image header: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImage(f"zero-size image {w}x{h}")
    if w * h > max_pixels:
        raise BadImage(f"image too large: {w}x{h} > {max_pixels} pixels")
    return img


def _orientation(img: Image.Image) -> int:
    if img.format in ("JPEG", "MPO") and "exif" not in img.info:  # the header had no EXIF block
        return 1
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # broken EXIF must not lose the image; it is ignored
        return 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded mode -> RGB: alpha composited on white, high bit depths scaled (not clipped)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples (PNG gives I;16 or I): map 0..65535 onto 0..255 by rounding v/257.
        # PIL's own convert("L") would clip everything above 255 to white.
        v = np.asarray(img).astype(np.int64)
        v = np.clip((v * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
        return Image.fromarray(v, "L").convert("RGB")
    if mode == "F":  # float samples: taken as 0..1 when they fit, else 0..255
        v = np.asarray(img, dtype=np.float64)
        scale = 255.0 if v.size and np.nanmax(v) <= 1.0 else 1.0
        v = np.clip(np.nan_to_num(v * scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(v, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        base = Image.new("RGB", img.size, _WHITE)
        base.paste(img, mask=img.getchannel("A"))
        return base
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _decode(img: Image.Image, draft_size: tuple[int, int] | None) -> Image.Image:
    orientation = _orientation(img)
    if draft_size is not None and img.format in ("JPEG", "MPO"):
        w, h = draft_size
        if orientation in _ROTATED:  # draft works on stored pixels, before rotation
            w, h = h, w
        img.draft("RGB", (max(1, int(w)), max(1, int(h))))  # largest 1/2^k scale still >= size
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, Image.DecompressionBombError) as e:
        raise BadImage(f"truncated or corrupt image data: {e}") from None
    if orientation != 1:
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # unusable EXIF: keep the stored orientation
            pass
    try:
        out = _to_rgb(img)
    except (OSError, ValueError) as e:
        raise BadImage(f"cannot convert mode {img.mode}: {e}") from None
    if out.width <= 0 or out.height <= 0:
        raise BadImage("zero-size image after decoding")
    return out


def load_rgb(data: bytes, *, draft_size: tuple[int, int] | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decodes image bytes to an RGB image; raises ``BadImage`` with the reason otherwise.

    ``draft_size=(w, h)``: JPEGs are decoded at the smallest 1/2, 1/4 or 1/8 scale that
    still covers ``w x h`` (in displayed orientation), much faster than a full decode.
    """
    return _decode(_open(data, max_pixels), draft_size)


def prepare(data: bytes, max_side: int | None = None, *, quality: int = 90,
            max_pixels: int = MAX_PIXELS) -> tuple[bytes, bool]:
    """``(bytes to store, re-encoded?)``: the original bytes when they are already a plain
    8-bit RGB/gray JPEG, PNG or WebP within ``max_side``, else a fresh JPEG (longer side
    <= ``max_side``). Always fully decodes once, so broken data raises ``BadImage`` here."""
    img = _open(data, max_pixels)
    fmt, mode, (w, h) = img.format, img.mode, img.size
    keep = fmt in ("JPEG", "PNG", "WEBP") and mode in ("RGB", "L") and (max_side is None or max(w, h) <= max_side)
    draft = None
    if max_side is not None and max(w, h) > max_side:
        scale = max_side / max(w, h)
        draft = (math.ceil(w * scale), math.ceil(h * scale))
        if _orientation(img) in _ROTATED:
            draft = (draft[1], draft[0])  # load_rgb's draft size is in displayed orientation
    rgb = _decode(img, None if keep else draft)  # validates every pixel even when kept
    if keep:
        return data, False
    if max_side is not None and max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue(), True
