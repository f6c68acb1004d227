"""Zero-shot classification and retrieval evaluation.

Pure metric functions live in `zeroshot` and `retrieval`; `runner` embeds
datasets with a model and schedules the evals configured in ``config.evals``
(see `config`); `classnames` holds the built-in class lists and templates.
"""

from clipjax.evals.config import evals_config, retrieval_eval, validate_evals_config, zeroshot_eval
from clipjax.evals.retrieval import embedding_diagnostics, retrieval_metrics, retrieval_ranks
from clipjax.evals.zeroshot import ensemble_prompts, zeroshot_accuracy, zeroshot_ranks

__all__ = ["evals_config", "retrieval_eval", "validate_evals_config", "zeroshot_eval", "embedding_diagnostics",
           "retrieval_metrics", "retrieval_ranks", "ensemble_prompts", "zeroshot_accuracy", "zeroshot_ranks"]
