"""clipjax: CLIP and SigLIP pretraining at large batch in JAX/Flax."""

__version__ = "0.1.0"


def load(workdir_or_weights, step=None, **kwargs):
    """A trained model ready to embed and classify: see ``clipjax.inference.load``."""
    from clipjax.inference import load as _load

    return _load(workdir_or_weights, step, **kwargs)
