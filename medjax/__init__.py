"""medjax: JAX/Flax library and trainer for RL post-training of medical LLM agents."""

__version__ = "0.1.0"
