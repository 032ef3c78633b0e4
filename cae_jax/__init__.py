"""cae-jax: deepfake detection by joint reconstruction and classification, in JAX/Flax."""

__version__ = "0.1.0"
