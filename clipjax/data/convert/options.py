"""Options shared by every converter, and the one error type they raise."""

from __future__ import annotations

from dataclasses import dataclass

from clipjax.data.captions import MAX_CHARS
from clipjax.errors import UserError

# A member or image file above this is skipped unread (a 1 GiB text member must not
# be held in memory); the largest image the pipeline accepts (64 MP) compresses to far less.
MAX_INPUT_BYTES = 64 * 2**20


class ConvertError(UserError, RuntimeError):
    """The conversion cannot proceed or skipped too much; the message (one line) says why and what to do."""


@dataclass(frozen=True)
class ConvertOptions:
    out_dir: str
    split: str = "train"
    examples_per_shard: int = 5000  # csv/coco/folder; wds keeps one output shard per input tar
    max_side: int | None = None  # re-encode images whose longer side is larger
    quality: int = 90  # JPEG quality of re-encoded images
    max_caption_chars: int = MAX_CHARS
    max_input_bytes: int = MAX_INPUT_BYTES  # larger image files / tar members are skipped unread
    workers: int = 1
    max_skip_fraction: float = 0.1
    overwrite: bool = False  # rewrite a split converted from other inputs or options
    skipped_report: str | None = None  # write one JSON line per skipped input here

    def output_affecting(self) -> dict:
        """The options that change the written records (the rest only change how the work is run)."""
        return {"split": self.split, "max_side": self.max_side, "quality": self.quality,
                "max_caption_chars": self.max_caption_chars, "max_input_bytes": self.max_input_bytes}
