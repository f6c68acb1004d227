"""The ``config.evals`` section: named evaluations, each with its own cadence."""

from __future__ import annotations

import ml_collections


def evals_config() -> ml_collections.ConfigDict:
    """No evaluations by default; config files add named entries."""
    return ml_collections.ConfigDict()


def validate_evals_config(evals: ml_collections.ConfigDict) -> None:
    """Checks every named evaluation (filled in with the evaluation work)."""
    del evals
