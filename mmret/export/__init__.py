"""Export a run to users' tools: a plain Hugging Face model directory with what defines its embedding or its
reranker score (:mod:`mmret.export.run`, :mod:`mmret.export.files`) and a model card (:mod:`mmret.export.card`)."""

from mmret.export.run import export_run

__all__ = ["export_run"]
