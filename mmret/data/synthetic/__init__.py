"""A synthetic corpus in the exact M-BEIR layout: rendered scenes and the texts that describe them.

``scenes`` (objects, rendering, descriptions), ``tasks`` (the 16 dataset-tasks and how each needs its
modalities), ``writer`` (ids, pools, qrels, instructions, images). Entry point:
:func:`write_synthetic_mbeir`, or ``tools/make_synthetic_mbeir.py``.
"""

from mmret.data.mbeir import TASK_MODALITIES
from mmret.data.synthetic.tasks import DATASETS, FUSION_TASK_IDS, TASKS, TaskSpec
from mmret.data.synthetic.writer import SCALES, Summary, write_corpus, write_synthetic_mbeir

__all__ = [
    "DATASETS",
    "FUSION_TASK_IDS",
    "SCALES",
    "TASKS",
    "TASK_MODALITIES",
    "Summary",
    "TaskSpec",
    "write_corpus",
    "write_synthetic_mbeir",
]
