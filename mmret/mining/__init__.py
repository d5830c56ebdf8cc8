"""Hard-negative mining: a run's checkpoint embeds the training queries and a pool (``mine``), a rule picks
each query's negatives from its ranking (``rules``: U-MARVEL's, MM-Embed's modality-aware one), copies of the
positives are filtered out (``false_negatives``). The output is the negatives file training reads."""
