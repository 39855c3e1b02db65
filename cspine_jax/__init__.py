"""cspine_jax: one compact 2.5D JAX/Flax network for cervical spine fracture detection."""

__version__ = "0.1.0"
