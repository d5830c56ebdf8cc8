"""The pointwise reranker task (:mod:`mmret.tasks.reranker.task`)."""
