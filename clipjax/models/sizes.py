"""The one table of model sizes (mirrors OpenCLIP's ViT configs).

Each row gives the image tower (width, depth, heads, mlp_dim, patch_size), the
text tower (width, depth, heads, mlp_dim) and the joint embedding width. With
OpenCLIP's defaults (224 px, context 77, vocab 49408) parameter counts equal
OpenCLIP's: ViT-B/32 is 151,277,313.
"""

from __future__ import annotations

from typing import Any


def _row(embed, iw, idepth, iheads, imlp, patch, tw, tdepth, theads, tmlp) -> dict[str, Any]:
    return {
        "embed_dim": embed,
        "image": {"width": iw, "depth": idepth, "heads": iheads, "mlp_dim": imlp, "patch_size": patch},
        "text": {"width": tw, "depth": tdepth, "heads": theads, "mlp_dim": tmlp},
    }


SIZES: dict[str, dict[str, Any]] = {
    # CPU-sized towers for tests and the demo.
    "tiny": _row(128, 128, 4, 4, 512, 8, 128, 4, 4, 512),
    "S/32": _row(384, 384, 12, 6, 1536, 32, 384, 12, 6, 1536),
    "S/16": _row(384, 384, 12, 6, 1536, 16, 384, 12, 6, 1536),
    "B/32": _row(512, 768, 12, 12, 3072, 32, 512, 12, 8, 2048),
    "B/16": _row(512, 768, 12, 12, 3072, 16, 512, 12, 8, 2048),
    "L/14": _row(768, 1024, 24, 16, 4096, 14, 768, 12, 12, 3072),
    "H/14": _row(1024, 1280, 32, 16, 5120, 14, 1024, 24, 16, 4096),
    # g/14: head width 88 and mlp_ratio 4.3637 -> int(1408 * 4.3637) = 6144.
    "g/14": _row(1024, 1408, 40, 16, 6144, 14, 1024, 24, 16, 4096),
}


def decoder_row(row: dict[str, Any]) -> dict[str, Any]:
    """The captioning decoder of a size: SigLIP 2's LocCa decoder has the text tower's shape, half its layers."""
    t = row["text"]
    return {"width": t["width"], "depth": max(1, t["depth"] // 2), "heads": t["heads"], "mlp_dim": t["mlp_dim"]}


def get_size(name: str) -> dict[str, Any]:
    """The size row with its ``decoder`` (``decoder_row``)."""
    if name not in SIZES:
        raise ValueError(f"model.size={name!r} is not in the size table; choose one of {list(SIZES)}")
    return {**SIZES[name], "decoder": decoder_row(SIZES[name])}
