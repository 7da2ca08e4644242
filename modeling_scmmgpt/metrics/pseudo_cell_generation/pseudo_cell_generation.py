"""Pseudo-cell generation metrics (scMMGPT's text-to-cell task): k-NN label accuracy and RBF-kernel MMD."""

import datasets
import evaluate
import numpy as np
from sklearn.neighbors import KNeighborsClassifier


_CITATION = """\
@article{shi2025scmmgpt,
  title={Multimodal Language Modeling for High-Accuracy Single Cell Transcriptomics Analysis and Generation},
  author={Shi, Yaorui and others},
  journal={arXiv preprint arXiv:2503.09427},
  year={2025}
}
@article{gretton2012kernel,
  title={A Kernel Two-Sample Test},
  author={Gretton, Arthur and Borgwardt, Karsten M. and Rasch, Malte J. and Sch{\\"o}lkopf, Bernhard and
          Smola, Alexander},
  journal={Journal of Machine Learning Research},
  volume={13},
  pages={723--773},
  year={2012}
}
"""

_DESCRIPTION = """\
Scores generated ("pseudo") cells against real cells of the types they were generated for.

- k-NN accuracy: a k-nearest-neighbour classifier (scikit-learn, majority vote, Euclidean by default) is fitted on
  the real cells and their labels; the score is the fraction of generated cells it assigns to the type they were
  generated for. Every intended type must occur among the real labels.
- MMD: the unbiased estimate of the squared maximum mean discrepancy (MMD^2_u, Gretton et al. 2012, Eq. 3)
  between generated and real cells, with the RBF kernel k(x, y) = exp(-||x - y||^2 / (2 sigma^2)). The bandwidth
  sigma follows the median heuristic: the median Euclidean distance over all pairs of distinct rows of the pooled
  (generated + real) sample (1.0 if that median is 0). MMD^2_u is about 0 for samples of one distribution and
  can be slightly negative; for two identical sets of m cells it equals -2 (1 - a) / m, a being the mean kernel
  value between different cells. With `per_type=True`, MMD is also computed per cell type, reusing the overall
  sigma so the per-type values share one scale.

Cells are rows of expression values over the same genes, in the same order, for generated and real cells, and
preprocessed the same way (e.g. log1p-normalised or embedded); both are compared in float32 precision, since
generated cells are stored as float32 features. The pairwise kernel needs O(n^2) memory, so MMD subsamples each
side to `mmd_max_samples` cells (seeded); k-NN uses all cells.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, or 2-D array): generated cells, one row per cell.
    references (`list` of `str`): the cell type each generated cell was generated for.
    real_cells (2-D array-like of `float`): real cells, same genes (columns) as `predictions`.
    real_labels (`list` of `str`): cell type of each real cell.
    k (`int`, defaults to 5): neighbours of the k-NN classifier.
    knn_metric (`str`, defaults to `"euclidean"`): distance of the k-NN classifier (any scikit-learn metric name).
    per_type (`bool`, defaults to `False`): also report k-NN accuracy and MMD per cell type.
    mmd_max_samples (`int` or `None`, defaults to 2000): per-side subsample size for MMD; `None` uses all cells.
    seed (`int`, defaults to 0): seed of the MMD subsampling.
Returns:
    knn_accuracy (`float`): fraction of generated cells the k-NN classifier labels with their intended type.
    mmd (`float`): unbiased squared MMD between generated and real cells (RBF kernel, median heuristic); needs at
        least 2 generated and 2 real cells.
    within_type_spread (`float` or `None`): mean over intended types with at least 2 generated and 2 real cells of
        (mean Euclidean distance between distinct generated cells of the type) / (the same among its real cells):
        0 when every cell generated for a type is the same profile, about 1 for real-like spread.
    centroid_correlation (`float`): mean over intended types of the Pearson correlation between the mean generated
        cell and the mean real cell of that type (genes as observations).
    mmd_bandwidth (`float`): the sigma used.
    knn_accuracy_per_type (`dict[str, float]`), mmd_per_type (`dict[str, float]`): only with `per_type=True`;
        MMD only for types with at least 2 generated and 2 real cells.
Examples:
    >>> metric = PseudoCellGenerationMetric()
    >>> real = [[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]]
    >>> metric.compute(predictions=[[0.0, 0.1], [5.0, 5.1]], references=["a", "b"], real_cells=real,
    ...                real_labels=["a", "a", "b", "b"], k=1)["knn_accuracy"]
    1.0
"""


def _as_cells(value, name: str) -> np.ndarray:
    """A (cells, genes) float32 matrix, with a clear error for ragged rows, wrong rank or non-finite values."""
    if hasattr(value, "toarray"):  # scipy sparse, e.g. AnnData.X
        value = value.toarray()
    # An array is split into its rows too (cheap views), so that one path checks every input.
    rows = [np.asarray(row, dtype=np.float32) for row in value]
    if not rows:
        raise ValueError(f"`{name}` holds no cells.")
    if any(row.ndim != 1 for row in rows):
        shape = next(row.shape for row in rows if row.ndim != 1)
        raise ValueError(f"`{name}` must be 2-D (cells x genes); got a row of shape {shape}.")
    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        raise ValueError(
            f"`{name}`: cells have different gene counts {sorted(lengths)}; all rows must have one length."
        )
    cells = np.stack(rows)
    bad = ~np.isfinite(cells)
    if bad.any():
        raise ValueError(
            f"`{name}` has {int(bad.sum())} NaN/infinite values in {int(bad.any(axis=1).sum())} cells; "
            "fill or drop them before scoring."
        )
    return cells


def _type_structure(generated, intended, real, real_labels) -> dict:
    """`within_type_spread` and `centroid_correlation` (see the kwargs description)."""
    spreads, correlations = [], []
    for label in sorted(set(intended.tolist())):
        gen, ref = generated[intended == label], real[real_labels == label]
        g_mean, r_mean = gen.mean(0), ref.mean(0)
        if g_mean.std() > 0 and r_mean.std() > 0:
            correlations.append(float(np.corrcoef(g_mean, r_mean)[0, 1]))
        else:
            correlations.append(0.0)
        if len(gen) >= 2 and len(ref) >= 2:
            real_spread = _mean_pairwise_distance(ref)
            if real_spread > 0:
                spreads.append(_mean_pairwise_distance(gen) / real_spread)
    return {
        "within_type_spread": float(np.mean(spreads)) if spreads else None,
        "centroid_correlation": float(np.mean(correlations)),
    }


def _mean_pairwise_distance(cells: np.ndarray) -> float:
    n = len(cells)
    return float(np.sqrt(_squared_distances(cells, cells)).sum() / (n * (n - 1)))


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # ||x||^2 + ||y||^2 - 2 x.y in float64; clip the tiny negatives that cancellation leaves for equal rows.
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.maximum(d2, 0.0)


def _median_bandwidth(sq_dists: np.ndarray) -> float:
    upper = np.triu_indices(len(sq_dists), k=1)
    median = float(np.median(np.sqrt(sq_dists[upper])))
    return median if median > 0 else 1.0


def _mmd_from_pooled(sq_dists: np.ndarray, m: int, sigma: float) -> float:
    """Unbiased MMD^2 from the squared distances of the pooled sample, whose first `m` rows are the first set."""
    n = len(sq_dists) - m
    if m < 2 or n < 2:
        raise ValueError(f"MMD needs at least 2 cells on each side, got {m} generated and {n} real.")
    kernel = np.exp(-sq_dists / (2.0 * sigma**2))
    k_xx, k_yy, k_xy = kernel[:m, :m], kernel[m:, m:], kernel[:m, m:]
    # Within-set means skip the diagonal k(x_i, x_i) = 1: that is what makes the estimate unbiased.
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def median_heuristic_bandwidth(x: np.ndarray, y: np.ndarray) -> float:
    """Median Euclidean distance over pairs of distinct rows of the pooled sample; 1.0 if that median is 0."""
    pooled = np.concatenate([x, y])
    return _median_bandwidth(_squared_distances(pooled, pooled))


def mmd_unbiased(x: np.ndarray, y: np.ndarray, sigma: float) -> float:
    """Unbiased MMD^2 between the rows of `x` and `y` with an RBF kernel of bandwidth `sigma` (Gretton et al. 2012)."""
    pooled = np.concatenate([x, y])
    return _mmd_from_pooled(_squared_distances(pooled, pooled), len(x), sigma)


def _subsample(cells: np.ndarray, max_samples, rng: np.random.Generator) -> np.ndarray:
    if max_samples is None or len(cells) <= max_samples:
        return cells
    return cells[np.sort(rng.choice(len(cells), size=max_samples, replace=False))]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PseudoCellGenerationMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Only the generated cells and their intended labels are per-example inputs; the real reference set
            # has its own size, so it is a compute() keyword argument.
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("string"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2503.09427", "https://jmlr.org/papers/v13/gretton12a.html"],
        )

    def _compute(
        self,
        predictions,
        references,
        real_cells=None,
        real_labels=None,
        k=5,
        knn_metric="euclidean",
        per_type=False,
        mmd_max_samples=2000,
        seed=0,
    ):
        if real_cells is None or real_labels is None:
            raise ValueError("pseudo_cell_generation needs `real_cells` and `real_labels`.")
        generated = _as_cells(predictions, "predictions")
        real = _as_cells(real_cells, "real_cells")
        if generated.shape[1] != real.shape[1]:
            raise ValueError(
                f"Generated cells have {generated.shape[1]} genes but real cells have {real.shape[1]}; "
                "both must be over the same genes in the same order."
            )
        intended = np.asarray([str(label) for label in references])
        real_labels = np.asarray([str(label) for label in real_labels])
        if len(real_labels) != len(real):
            raise ValueError(f"{len(real)} real cells but {len(real_labels)} real labels.")
        unknown = sorted(set(intended.tolist()) - set(real_labels.tolist()))
        if unknown:
            raise ValueError(f"Intended cell types absent from `real_labels`, so k-NN cannot recover them: {unknown}.")
        if not 1 <= k <= len(real):
            raise ValueError(f"k must be between 1 and the number of real cells ({len(real)}), got {k}.")

        knn = KNeighborsClassifier(n_neighbors=k, metric=knn_metric).fit(real, real_labels)
        correct = knn.predict(generated) == intended

        rng = np.random.default_rng(seed)
        gen_sample = _subsample(generated, mmd_max_samples, rng)
        real_sample = _subsample(real, mmd_max_samples, rng)
        pooled = np.concatenate([gen_sample, real_sample])
        sq_dists = _squared_distances(pooled, pooled)  # once, for both the bandwidth and the MMD
        sigma = _median_bandwidth(sq_dists)
        result = {
            "knn_accuracy": float(correct.mean()),
            "mmd": _mmd_from_pooled(sq_dists, len(gen_sample), sigma),
            "mmd_bandwidth": sigma,
        }
        result.update(_type_structure(generated, intended, real, real_labels))
        if per_type:
            result["knn_accuracy_per_type"] = {}
            result["mmd_per_type"] = {}
            for label in sorted(set(intended.tolist())):  # plain str keys, not np.str_
                gen_of_type = generated[intended == label]
                real_of_type = real[real_labels == label]
                result["knn_accuracy_per_type"][label] = float(correct[intended == label].mean())
                if len(gen_of_type) >= 2 and len(real_of_type) >= 2:
                    result["mmd_per_type"][label] = mmd_unbiased(
                        _subsample(gen_of_type, mmd_max_samples, rng),
                        _subsample(real_of_type, mmd_max_samples, rng),
                        sigma,
                    )
        return result
