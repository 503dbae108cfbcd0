"""scse_jax: spatial and channel squeeze-and-excitation U-Nets in JAX/Flax."""

__version__ = "0.1.0"
