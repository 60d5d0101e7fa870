"""lance-jax: a JAX/Flax implementation of ByteDance's Lance unified multimodal model."""

__version__ = "0.1.0"
