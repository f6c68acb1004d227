"""clipjax: CLIP and SigLIP pretraining at large batch in JAX/Flax."""

__version__ = "0.1.0"
