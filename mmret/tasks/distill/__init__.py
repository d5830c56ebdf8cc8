"""The distill task: listwise distillation of a reranker teacher into the retriever (U-MARVEL stage 5)."""
