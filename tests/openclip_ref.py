"""OpenCLIP (PyTorch) as a test reference; every test imports it through ``open_clip()``."""

from __future__ import annotations

import sys
import types


def open_clip():
    """The ``open_clip`` module, importable beside the CPU-only torch wheel.

    PyPI's torchvision registers meta kernels for CUDA-built torch ops at import
    and fails beside torch's CPU wheel; OpenCLIP needs none of them, so that
    module is stubbed before torchvision is first imported.
    """
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import open_clip as module

    return module


def transformers():
    """The ``transformers`` module, importable beside the CPU-only torch wheel (see ``open_clip``)."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import transformers as module

    return module
