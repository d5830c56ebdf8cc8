"""Evaluation: the M-BEIR Recall@k metric and TREC run files (``metrics``), published numbers, the report."""
