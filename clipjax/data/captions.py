"""Caption sanitising for the converters: valid UTF-8, no control clutter, bounded length."""

from __future__ import annotations

import re

__all__ = ["BadCaption", "clean_caption_info", "MAX_CHARS"]

MAX_CHARS = 4096  # far beyond any tokenizer window (77 tokens); keeps records small
# C0/C1 control characters other than tab/newline/CR, and NUL: they only come from broken scrapes.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SPACE = re.compile(r"\s+")


class BadCaption(ValueError):
    """A caption that cannot be used; ``str(e)`` is the reason."""


def clean_caption_info(raw: bytes | str, *, max_chars: int = MAX_CHARS) -> tuple[str, bool]:
    """``(text, whether it was cut)``: UTF-8 with control characters removed, whitespace
    collapsed, cut to ``max_chars``.

    Raises ``BadCaption`` for bytes that are not valid UTF-8 (a wrong encoding would
    silently become mojibake) and for captions that are empty after cleaning.
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        if raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark from Windows tools
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadCaption(f"caption is not valid UTF-8 (byte {e.start})") from None
    elif isinstance(raw, str):
        text = raw
    else:
        raise BadCaption(f"caption is a {type(raw).__name__}, not text")
    if len(text) > 4 * max_chars:  # bound the regex work on absurd inputs before cleaning
        text = text[: 4 * max_chars]
    text = _SPACE.sub(" ", _CONTROL.sub("", text)).strip()
    # Lone surrogates (from JSON "\udXXX" escapes) cannot be stored as UTF-8 in a record.
    text = text.encode("utf-8", errors="replace").decode("utf-8") if not _is_utf8_safe(text) else text
    if not text:
        raise BadCaption("empty caption")
    if len(text) <= max_chars:
        return text, False
    cut = text.rfind(" ", 0, max_chars + 1)
    return text[: cut if cut > max_chars // 2 else max_chars].rstrip(), True  # prefer a word boundary


def _is_utf8_safe(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
