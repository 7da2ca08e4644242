"""scMMGPT's evaluation metrics as local `evaluate` modules (no Hub access needed).

Each metric lives in its own folder `<name>/<name>.py`, the layout `evaluate.load` expects of a local module, and
its script imports only libraries and files of its own folder, because `evaluate` copies just those into its
cache. Use a metric either way:

    >>> import evaluate
    >>> from modeling_scmmgpt.metrics import CellTypeAnnotationMetric, metric_path
    >>> metric = evaluate.load(metric_path("cell_type_annotation"))  # or CellTypeAnnotationMetric()
    >>> metric.compute(predictions=["T cell"], references=["T cell"])["accuracy"]
    1.0

- `cell_description`: BLEU-2/4, ROUGE-1/2/L, METEOR of generated cell descriptions (cell -> text).
- `cell_type_annotation`: accuracy and macro-F1 of predicted cell type labels (cell -> label).
- `pseudo_cell_generation`: k-NN label accuracy and RBF-kernel MMD of generated cells (text -> cell).
"""

import os

import evaluate

from .cell_description.cell_description import CellDescriptionMetric
from .cell_type_annotation.cell_type_annotation import CellTypeAnnotationMetric
from .pseudo_cell_generation.pseudo_cell_generation import PseudoCellGenerationMetric


METRIC_NAMES = ("cell_description", "cell_type_annotation", "pseudo_cell_generation")


def metric_path(name: str) -> str:
    """The folder of metric `name`, to pass to `evaluate.load`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; choose one of {METRIC_NAMES}.")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load(metric_path(name), **kwargs)`."""
    return evaluate.load(metric_path(name), **kwargs)


__all__ = [
    "METRIC_NAMES",
    "CellDescriptionMetric",
    "CellTypeAnnotationMetric",
    "PseudoCellGenerationMetric",
    "load_metric",
    "metric_path",
]
