"""mmret: multimodal LLMs trained into universal multimodal retrievers, in JAX/Flax.

``mmret.Retriever`` (:mod:`mmret.pretrained`) loads an exported retriever or a run and embeds inputs.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Retriever":  # imported on first use: ``import mmret`` stays light
        from mmret.pretrained import Retriever

        return Retriever
    raise AttributeError(f"module 'mmret' has no attribute {name!r}")
