"""mmret: multimodal LLMs trained into universal multimodal retrievers, in JAX/Flax."""

__version__ = "0.1.0"
