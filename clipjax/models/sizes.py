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
    # SigLIP / SigLIP 2 (transformers' SiglipModel, big_vision's two_towers): the image tower has no
    # projection, so embed_dim is its width; g-opt's 1152-wide text tower projects to 1536.
    "siglip-B/16": _row(768, 768, 12, 12, 3072, 16, 768, 12, 12, 3072),
    "siglip-L/16": _row(1024, 1024, 24, 16, 4096, 16, 1024, 24, 16, 4096),
    "siglip-So400m/14": _row(1152, 1152, 27, 16, 4304, 14, 1152, 27, 16, 4304),
    "siglip-So400m/16": _row(1152, 1152, 27, 16, 4304, 16, 1152, 27, 16, 4304),
    "siglip2-g-opt/16": _row(1536, 1536, 40, 16, 6144, 16, 1152, 27, 16, 4304),
}

# Released checkpoints of the SigLIP rows: (family, image_size, context_length, vocab_size).
# Vocabularies: 32000 English SentencePiece, 250000 multilingual ("i18n"), 256000 Gemma (SigLIP 2).
RELEASES: dict[str, tuple[tuple[str, int, int, int], ...]] = {
    "siglip-B/16": (("siglip", 224, 64, 32000), ("siglip", 256, 64, 32000), ("siglip", 384, 64, 32000),
                    ("siglip", 512, 64, 32000), ("siglip-i18n", 256, 64, 250000),
                    ("siglip2", 224, 64, 256000), ("siglip2", 256, 64, 256000), ("siglip2", 384, 64, 256000),
                    ("siglip2", 512, 64, 256000)),
    "siglip-L/16": (("siglip", 256, 64, 32000), ("siglip", 384, 64, 32000),
                    ("siglip2", 256, 64, 256000), ("siglip2", 384, 64, 256000), ("siglip2", 512, 64, 256000)),
    "siglip-So400m/14": (("siglip", 224, 16, 32000), ("siglip", 384, 64, 32000),
                         ("siglip2", 224, 64, 256000), ("siglip2", 384, 64, 256000)),
    "siglip-So400m/16": (("siglip-i18n", 256, 64, 250000), ("siglip2", 256, 64, 256000),
                         ("siglip2", 384, 64, 256000), ("siglip2", 512, 64, 256000)),
    "siglip2-g-opt/16": (("siglip2", 256, 64, 256000), ("siglip2", 384, 64, 256000)),
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
