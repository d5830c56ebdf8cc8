"""Listwise distillation of a reranker into the retriever (U-MARVEL stage 5): the teacher lists."""
