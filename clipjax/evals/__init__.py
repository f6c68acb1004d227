"""Zero-shot classification, retrieval and (with the LocCa decoder) captioning evaluation.

Pure metric functions live in `zeroshot`, `retrieval` and `captioning`; `evaluator` runs the
evals configured in ``config.evals`` (see `config`) at their cadence, with the
jitted passes of `encoders` over the data of `datasets`, and `report` shows and
keeps the results; `classnames` holds the built-in class lists and templates.
"""

from clipjax.evals.config import captioning_eval, evals_config, retrieval_eval, validate_evals_config, zeroshot_eval
from clipjax.evals.retrieval import embedding_diagnostics, retrieval_metrics, retrieval_ranks
from clipjax.evals.zeroshot import ensemble_prompts, zeroshot_ranks

__all__ = ["captioning_eval", "evals_config", "retrieval_eval", "validate_evals_config", "zeroshot_eval", "embedding_diagnostics",
           "retrieval_metrics", "retrieval_ranks", "ensemble_prompts", "zeroshot_ranks"]
