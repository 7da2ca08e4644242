"""Cell type annotation metrics (scMMGPT's cell-to-label task): accuracy and macro-F1 over string labels."""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, f1_score


_CITATION = """\
@article{shi2025scmmgpt,
  title={Multimodal Language Modeling for High-Accuracy Single Cell Transcriptomics Analysis and Generation},
  author={Shi, Yaorui and others},
  journal={arXiv preprint arXiv:2503.09427},
  year={2025}
}
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O. and
          Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A. and
          Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""

_DESCRIPTION = """\
Accuracy and macro-F1 of predicted cell type labels (strings, e.g. Cell Ontology names) against the true ones,
computed with scikit-learn.

A generative annotator can answer a label that never occurs among the references. Such a prediction is simply
wrong: it costs accuracy and the recall of the true class. By default macro-F1 averages over the classes that
occur in the references only, so each made-up label does not also add a zero-F1 class to the average; pass
`labels=` to average over another class set (e.g. the union of true and predicted labels, scikit-learn's default).
`unknown_prediction_rate` reports how often predictions fall outside that class set.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): predicted cell type labels.
    references (`list` of `str`): true cell type labels.
    labels (`list` of `str`, *optional*): the classes macro-F1 averages over; defaults to the sorted set of
        reference labels. A listed class absent from both predictions and references gets F1 = 0.
    normalize (`bool`, defaults to `False`): compare labels case-insensitively, with surrounding whitespace and
        a trailing period removed and inner whitespace collapsed (useful for free-text model answers).
Returns:
    accuracy (`float`): fraction of exact label matches.
    macro_f1 (`float`): unweighted mean of the per-class F1 scores over `labels`.
    per_class_f1 (`dict[str, float]`): F1 of each class in `labels`.
    unknown_prediction_rate (`float`): fraction of predictions that are not in `labels`.
Examples:
    >>> metric = CellTypeAnnotationMetric()
    >>> metric.compute(predictions=["T cell", "B cell"], references=["T cell", "T cell"])["accuracy"]
    0.5
"""


def normalize_label(label: str) -> str:
    """Casefold, collapse whitespace and drop a trailing period: "  CD4-positive T cell. " -> "cd4-positive t cell"."""
    return " ".join(label.split()).rstrip(".").strip().casefold()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CellTypeAnnotationMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=[
                "https://arxiv.org/abs/2503.09427",
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html",
            ],
        )

    def _compute(self, predictions, references, labels=None, normalize=False):
        if len(predictions) == 0:
            raise ValueError("cell_type_annotation needs at least one prediction.")
        norm = normalize_label if normalize else str
        y_pred = [norm(p) for p in predictions]
        y_true = [norm(r) for r in references]
        # dict.fromkeys: de-duplicate user labels (normalisation can merge some) but keep their order.
        classes = sorted(set(y_true)) if labels is None else list(dict.fromkeys(norm(label) for label in labels))
        if not classes:
            raise ValueError("`labels` must name at least one class.")
        f1 = f1_score(y_true, y_pred, labels=classes, average=None, zero_division=0)
        known = set(classes)
        return {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(np.mean(f1)),
            "per_class_f1": {label: float(score) for label, score in zip(classes, f1, strict=True)},
            "unknown_prediction_rate": float(np.mean([p not in known for p in y_pred])),
        }
