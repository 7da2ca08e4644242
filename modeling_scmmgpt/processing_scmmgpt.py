"""Processors: cells (AnnData, numpy, scipy sparse) to encoder inputs, and text with cell spans to LM inputs."""

from __future__ import annotations

import copy
import difflib
import inspect
import json
import logging
import os
import re
from functools import lru_cache

import numpy as np
import scipy.sparse as sp
from transformers import AutoTokenizer, BatchFeature, FeatureExtractionMixin, PreTrainedTokenizerBase
from transformers.processing_utils import ProcessorMixin
from transformers.utils import PROCESSOR_NAME, cached_file

from .gene_vocab import GENE_VOCAB_NAME, GeneCoverage, GeneVocab
from .utils import atomic_write_text, read_json


logger = logging.getLogger(__name__)

# Folders saved before the cell processor was a feature extractor hold its options here, and a processor_config.json
# without a "feature_extractor" entry; both still load.
LEGACY_CELL_PROCESSOR_NAME = "cell_processor_config.json"
# The loader keywords of `from_pretrained` that locate files, passed on to every file we resolve ourselves.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "token", "revision", "subfolder")
CELL_START_TOKEN, CELL_END_TOKEN = "<cell>", "</cell>"


def cell_token(i: int) -> str:
    return f"<cell_{i}>"


# --- per-cell value transforms ----------------------------------------------------------------------------------------
def _is_examples(cells) -> bool:
    """Sparse examples: a list of dicts with `gene_ids`/`values`, a batch dict of such lists, or an Arrow table."""
    if isinstance(cells, dict) or hasattr(cells, "column_names"):
        names = cells.keys() if isinstance(cells, dict) else cells.column_names
        return "gene_ids" in names and "values" in names
    return isinstance(cells, (list, tuple)) and len(cells) > 0 and isinstance(cells[0], dict)


def _ragged_examples(cells):
    """Sparse examples as flat arrays: `(gene ids, values, offsets, where)`, example `i` at
    `offsets[i]:offsets[i + 1]` and `where(i)` its name for errors. Arrow tables (`dataset.with_format("arrow")`)
    are read without copying into Python lists, which is what keeps streaming tokenisation fast."""
    if hasattr(cells, "column_names"):
        ids = cells.column("cell_id").to_pylist() if "cell_id" in cells.column_names else None
        (gene_offsets, genes), (value_offsets, values) = (
            _flat_list_column(cells.column(n)) for n in ("gene_ids", "values")
        )
    else:
        if isinstance(cells, dict):
            ids, genes_per_cell, values_per_cell = cells.get("cell_id"), cells["gene_ids"], cells["values"]
        else:
            ids = [cell.get("cell_id", "no id") for cell in cells]
            genes_per_cell, values_per_cell = [c["gene_ids"] for c in cells], [c["values"] for c in cells]
        gene_offsets, value_offsets = (
            np.cumsum([0] + [len(x) for x in col]) for col in (genes_per_cell, values_per_cell)
        )
        genes = np.concatenate(
            [np.asarray(g, dtype=np.int64).ravel() for g in genes_per_cell] or [np.zeros(0, np.int64)]
        )
        values = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values_per_cell] or [np.zeros(0)])

    def where(i: int) -> str:
        return f"example {i} ({ids[i] if ids else 'no id'})"

    if not np.array_equal(gene_offsets, value_offsets):
        i = int(np.flatnonzero(np.diff(gene_offsets) != np.diff(value_offsets))[0])
        raise ValueError(
            f"{where(i)} has {gene_offsets[i + 1] - gene_offsets[i]} gene_ids but "
            f"{value_offsets[i + 1] - value_offsets[i]} values; each gene needs its value."
        )
    return genes.astype(np.int64, copy=False), values.astype(np.float64, copy=False), gene_offsets, where


def _flat_list_column(column):
    """(offsets, flat values) of an Arrow list column, as numpy arrays."""
    if hasattr(column, "combine_chunks"):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    return offsets - offsets[0], column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]


def check_expression_values(values: np.ndarray, where: str) -> None:
    """Raises a clear error for NaN, infinite or negative expression values (`where` names the cell)."""
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{where} has NaN or infinite values; clean the matrix before processing.")
    if (values < 0).any():
        raise ValueError(
            f"{where} has negative values: the matrix looks scaled or centred. Pass raw counts or log-normalised "
            "values (e.g. use_raw=True or layer='counts')."
        )


def check_ragged_values(values: np.ndarray, offsets: np.ndarray, where) -> None:
    """[`check_expression_values`] over many cells at once (cell `i` at `offsets[i]:offsets[i + 1]`); the error
    names the first bad cell, `where(i)`."""
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        first = int(np.searchsorted(offsets, np.flatnonzero(bad)[0], side="right") - 1)
        check_expression_values(values[offsets[first] : offsets[first + 1]], where(first))


@lru_cache(maxsize=8)
def _quantile_levels(n_bins: int) -> np.ndarray:
    levels = np.linspace(0, 1, n_bins - 1)
    levels.flags.writeable = False
    return levels


def bin_values(values: np.ndarray, n_bins: int) -> np.ndarray:
    """scGPT's per-cell binning of the nonzero values into `n_bins - 1` quantile bins (bin 0 is for zeros).

    scGPT spreads a value that sits on several equal bin edges uniformly at random between them (its `_digitize`),
    so its embeddings change from run to run (scGPT issue #281). We take the middle of that range instead: the same
    bins as scGPT wherever there is no tie, and deterministic where there is.

    Args:
        values (`np.ndarray` of shape `(num_genes,)`): one cell's values, zeros allowed.
    Returns:
        `np.ndarray` of shape `(num_genes,)`, int64 bins in `[0, n_bins - 1]`.
    """
    return bin_ragged(np.asarray(values, dtype=np.float64), np.array([0, len(values)]), n_bins)


def bin_ragged(values: np.ndarray, offsets: np.ndarray, n_bins: int) -> np.ndarray:
    """[`bin_values`] for many cells at once, each cell binned on its own: cell `i` is
    `values[offsets[i]:offsets[i + 1]]`. The same bins, bit for bit, without a Python step per cell (which made
    tokenisation, not reading, the bottleneck of streaming)."""
    binned = np.zeros(values.shape, dtype=np.int64)
    cell = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    nonzero = values > 0
    x, x_cell = values[nonzero], cell[nonzero]
    if not len(x):
        return binned
    order = np.lexsort((x, x_cell))  # each cell's nonzero values, sorted, cell after cell
    sorted_x = x[order]
    counts = np.bincount(x_cell, minlength=len(offsets) - 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    edges = _linear_quantiles_ragged(sorted_x, starts, counts, _quantile_levels(n_bins))
    # searchsorted(edges, x, side="right") and side="left" per value within its own cell, for all cells in one
    # call: numpy orders complex numbers by real part, then imaginary part, so `cell + 1j * value` sorts cell by
    # cell, each cell by value (the integer real part and the value are both exact).
    flat_edges = (np.arange(len(edges))[:, None] + 1j * edges).ravel()
    keys = x_cell + 1j * x
    before = x_cell * edges.shape[1]  # the edges of the cells before
    left = np.searchsorted(flat_edges, keys, side="right") - before
    right = np.searchsorted(flat_edges, keys, side="left") - before
    binned[nonzero] = np.ceil(left + 0.5 * (right - left)).astype(np.int64)
    return binned


def _linear_quantiles_ragged(sorted_x, starts, counts, q) -> np.ndarray:
    """`np.quantile(x, q)` (method "linear") of each cell's sorted float64 segment
    `x = sorted_x[starts[i]:starts[i] + counts[i]]`, `(num_cells, len(q))`, with numpy's own index and lerp
    arithmetic, so the bin edges are bit-identical, for all cells in one step (cells without values get edges
    that are never read)."""
    n = np.maximum(counts, 1)[:, None]
    virtual = (n - 1) * q
    lo = np.floor(virtual)
    t = virtual - lo
    lo = lo.astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    last = len(sorted_x) - 1  # an empty cell's start may lie past the end
    a, b = sorted_x[np.minimum(starts[:, None] + lo, last)], sorted_x[np.minimum(starts[:, None] + hi, last)]
    diff = b - a
    return np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)


def _keep(keep: np.ndarray, token_ids, expression, cell, n_cells: int):
    """The kept entries of ragged cells, and the cells' new offsets (a cell may end up empty)."""
    cell = cell[keep]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(cell, minlength=n_cells))])
    return token_ids[keep], expression[keep], cell, offsets


def _concatenate_ragged(parts):
    """One `(ids, values, expression, offsets)` of ragged cells from consecutive parts."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0), np.zeros(1, np.int64)
    ends = np.cumsum([0] + [part[3][-1] for part in parts[:-1]])
    offsets = np.concatenate([[0]] + [part[3][1:] + end for part, end in zip(parts, ends)])
    return tuple(np.concatenate([part[k] for part in parts]) for k in range(3)) + (offsets,)


def _resolve(path_or_repo, filename: str, kwargs: dict) -> str | None:
    """`filename` in a local folder or a Hub repo (downloaded once, to the cache), or None when it has none."""
    path = str(path_or_repo)
    if not os.path.isdir(path) and (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1):
        raise FileNotFoundError(f"{path}: no such model folder (and not a Hub repo id, which is owner/name).")
    hub = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
    return cached_file(path, filename, _raise_exceptions_for_missing_entries=False, **hub)


# The cell tensors under the one name each keeps from the cell processor to every model entry point that reads cells
# (the cell encoder, the cell tower, `get_cell_features`, the composite models); the cells a model writes are
# `target_cell_*`.
CELL_INPUT_NAMES = ("cell_gene_ids", "cell_values", "cell_attention_mask")


def cell_inputs(batch) -> dict:
    """The cell tensors of `batch` (a cell processor's output, or any mapping holding them) that a model reads."""
    return {name: batch[name] for name in CELL_INPUT_NAMES}


class ScMMGPTCellProcessor(FeatureExtractionMixin):
    """Cells to cell-encoder inputs (`cell_gene_ids`, `cell_values`, `cell_attention_mask`) with scGPT's
    preprocessing. The names are the ones every model entry point takes, the cell encoder's and the composite
    models' alike, so a cell tensor keeps one name from this processor to the model.

    Per cell: optional `normalize_total` and `log1p` (these need raw counts), optional per-cell binning into
    `n_bins` (rank-based, so counts or log-normalised input give the same bins), then the `max_genes - 1`
    highest-expressed genes (ties broken by column order, so the choice is deterministic) and `<cls>` first.
    Every step looks at one cell only, so a cell's tensors never depend on the rest of its batch.

    Args:
        gene_vocab ([`GeneVocab`]): gene names to ids.
        max_genes (`int`, defaults to 1200): tokens per cell, `<cls>` included.
        n_bins (`int`, defaults to 51): bins for `binning=True`.
        binning (`bool`, defaults to `True`): bin values per cell, as scGPT's pre-trained models expect.
        normalize_total (`float`, *optional*): scale each cell's counts to this total first (scGPT uses 1e4).
        log1p (`bool`, defaults to `False`): apply `log1p` after `normalize_total`.
        include_zero_genes (`bool`, defaults to `False`): also feed known genes with zero expression.
        cls_value (`float`, defaults to -2.0): value at `<cls>` (scGPT's embedding path uses its pad value).
        pad_value (`float`, defaults to -2.0): value at padding.
        min_vocab_coverage (`float`, defaults to 0.5): fail when fewer input genes than this are known.
        gene_id_column (`str`, *optional*): `var` column holding gene names or Ensembl IDs, instead of `var_names`.
        layer (`str`, *optional*): read `adata.layers[layer]` instead of `adata.X`.
        use_raw (`bool`, defaults to `False`): read `adata.raw` (its `X` and `var_names`).

    A transformers feature extractor: `save_pretrained` writes the options and the gene vocabulary to
    `preprocessor_config.json` (inside a [`ScMMGPTProcessor`], to the `feature_extractor` entry of
    `processor_config.json`); `from_pretrained` and `AutoFeatureExtractor` read it from a folder or the Hub. The
    vocabulary is part of the config, not a file beside it, because the library builds a feature extractor from its
    config alone; folders saved with a `gene_vocab.json` (or scGPT's `vocab.json`) still load through
    `from_pretrained` and `AutoProcessor`.
    """

    model_input_names = list(CELL_INPUT_NAMES)

    def __init__(
        self,
        gene_vocab: GeneVocab,
        max_genes: int = 1200,
        n_bins: int = 51,
        binning: bool = True,
        normalize_total: float | None = None,
        log1p: bool = False,
        include_zero_genes: bool = False,
        cls_value: float = -2.0,
        pad_value: float = -2.0,
        min_vocab_coverage: float = 0.5,
        gene_id_column: str | None = None,
        layer: str | None = None,
        use_raw: bool = False,
    ):
        if max_genes < 2:
            raise ValueError(f"max_genes={max_genes} leaves no room for genes after <cls>; use at least 2.")
        if binning and (not isinstance(n_bins, int) or n_bins < 2):
            raise ValueError(f"n_bins={n_bins!r}: binning needs at least 2 bins (bin 0 holds the zeros).")
        if not 0 <= min_vocab_coverage <= 1:
            raise ValueError(f"min_vocab_coverage={min_vocab_coverage}: a fraction in [0, 1].")
        super().__init__()
        self.gene_vocab = gene_vocab
        # Every option is an attribute of its own name, which `to_dict` saves: one list (this signature) for both.
        arguments = locals()
        for name in ScMMGPTCellProcessor.option_names():
            setattr(self, name, arguments[name])
        self.last_coverage: GeneCoverage | None = None

    # --- configuration: the library's save/load, with the vocabulary as this extractor's data file ----------------
    @classmethod
    def option_names(cls) -> list[str]:
        return [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "gene_vocab")]

    def to_dict(self) -> dict:
        output = {name: getattr(self, name) for name in self.option_names()}
        output["gene_vocab"] = self.gene_vocab.to_dict()
        output["feature_extractor_type"] = type(self).__name__
        if getattr(self, "auto_map", None):  # set by `register_for_auto_class` saves, for trust_remote_code users
            output["auto_map"] = self.auto_map
        return output

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """The library's `save_pretrained` (and so `push_to_hub`) writes the config here: whole or not at all."""
        atomic_write_text(json_file_path, self.to_json_string())

    @classmethod
    def get_feature_extractor_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """The library's lookup (`preprocessor_config.json`, or the `feature_extractor` entry of a processor's
        `processor_config.json`), then the legacy `cell_processor_config.json`. A config without its `gene_vocab`
        (saved before the vocabulary moved into it) takes the one beside it (`gene_vocab.json`, or scGPT's
        `vocab.json`)."""
        try:
            options, rest = super().get_feature_extractor_dict(pretrained_model_name_or_path, **kwargs)
        except OSError:
            legacy = _resolve(pretrained_model_name_or_path, LEGACY_CELL_PROCESSOR_NAME, kwargs)
            if legacy is None:
                raise OSError(
                    f"{pretrained_model_name_or_path}: no preprocessor_config.json (nor the older "
                    f"{LEGACY_CELL_PROCESSOR_NAME}): it was not saved by ScMMGPTCellProcessor. Save one with "
                    "save_pretrained, or pass the model's own folder."
                ) from None
            options = read_json(legacy)
            rest = {k: v for k, v in kwargs.items() if k not in _HUB_KWARGS}
        if "gene_vocab" in options:
            return options, rest
        vocab = _resolve(pretrained_model_name_or_path, GENE_VOCAB_NAME, kwargs) or _resolve(
            pretrained_model_name_or_path, "vocab.json", kwargs
        )
        if vocab is None:
            raise FileNotFoundError(
                f"No gene vocabulary in {pretrained_model_name_or_path}: expected {GENE_VOCAB_NAME} or scGPT's "
                "vocab.json beside the processor's config."
            )
        return {**options, "gene_vocab": GeneVocab.from_pretrained(vocab)}, rest

    @classmethod
    def from_dict(cls, feature_extractor_dict: dict, **kwargs) -> ScMMGPTCellProcessor:
        """Builds the processor from saved options; keyword arguments that name an option override it.

        A saved option this class does not know is refused, with the closest known name. Other keyword arguments are
        the loaders' own (`pipeline()` and the Auto classes pass theirs, e.g. `dtype`, down to every part) and are
        ignored, as the library's `from_dict` ignores them, unless they look like a misspelt option."""
        options = {**feature_extractor_dict}
        for key in ("feature_extractor_type", "processor_class", "auto_map"):
            options.pop(key, None)
        gene_vocab = options.pop("gene_vocab", None)
        if isinstance(gene_vocab, dict):
            gene_vocab = GeneVocab.from_dict(gene_vocab)
        if not isinstance(gene_vocab, GeneVocab):
            raise ValueError(
                "ScMMGPTCellProcessor: this config has no gene vocabulary (a folder saved before it moved into the "
                "config keeps it in gene_vocab.json); load it with ScMMGPTCellProcessor.from_pretrained or "
                "AutoProcessor.from_pretrained, which read that file, and save it again."
            )
        known = cls.option_names()
        misspelt = [key for key in kwargs if key not in known and difflib.get_close_matches(key, known, n=1)]
        for key in sorted(set(options) - set(known)) + sorted(misspelt):
            close = difflib.get_close_matches(key, known, n=1)
            raise ValueError(
                f"ScMMGPTCellProcessor: unknown option {key!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + "; remove it or fix its spelling."
            )
        options.update({key: value for key, value in kwargs.items() if key in known})
        return cls(gene_vocab, **options)

    def check_cell_config(self, cell_config) -> None:
        """Refuses a cell encoder (`ScMMGPTCellConfig`) whose gene embeddings do not belong to this vocabulary: ids
        past its embedding table (a raw `IndexError`, or a device-side assert on a GPU), or, when the config records
        one, another vocabulary's fingerprint (a permuted vocabulary of the same size reads genes through the wrong
        rows, silently)."""
        vocab = self.gene_vocab
        if vocab.id_bound > cell_config.vocab_size:
            raise ValueError(
                f"The processor's gene vocabulary has ids up to {vocab.id_bound - 1}, but the model has "
                f"{cell_config.vocab_size} gene embeddings: the vocabulary belongs to another model. Load the processor "
                "from the model's own folder."
            )
        expected = cell_config.gene_vocab_fingerprint
        if expected is not None and expected != vocab.fingerprint:
            raise ValueError(
                f"The processor's gene vocabulary (fingerprint {vocab.fingerprint}) is not the one the model's gene "
                f"embeddings were trained with ({expected}). Load the processor from the model's own folder."
            )

    # --- inputs -----------------------------------------------------------------------------------------------------
    def matrix_and_genes(self, cells, gene_names=None):
        """Returns (matrix, gene names, where it was read) for AnnData, numpy or scipy input: the values this
        processor reads (`use_raw`, `layer`, `gene_id_column` applied), before any mapping to the vocabulary."""
        if hasattr(cells, "obs") and hasattr(cells, "var"):  # AnnData, in memory or backed
            if self.use_raw and self.layer is not None:
                raise ValueError(f"use_raw and layer={self.layer!r} both name the values to read; pick one.")
            if self.use_raw:
                if cells.raw is None:
                    raise ValueError("use_raw=True but adata.raw is empty; read adata.X or a layer instead.")
                matrix, var, source = cells.raw.X, cells.raw.var, "adata.raw.X"
                var_names = cells.raw.var_names
            elif self.layer is not None:
                if self.layer not in cells.layers:
                    raise KeyError(f"Layer {self.layer!r} not in adata.layers ({list(cells.layers)}).")
                matrix, var, var_names, source = (
                    cells.layers[self.layer],
                    cells.var,
                    cells.var_names,
                    f"adata.layers[{self.layer!r}]",
                )
            else:
                matrix, var, var_names, source = cells.X, cells.var, cells.var_names, "adata.X"
            if self.gene_id_column is not None:
                if self.gene_id_column not in var.columns:
                    raise KeyError(
                        f"gene_id_column={self.gene_id_column!r} is not a var column; available: {list(var.columns)}."
                    )
                names = var[self.gene_id_column].astype(str).tolist()
            else:
                names = [str(g) for g in var_names]
            return matrix, names, source
        if gene_names is None:
            raise ValueError("Pass gene_names (one per column) with a numpy or scipy matrix.")
        matrix = cells if sp.issparse(cells) else np.atleast_2d(np.asarray(cells))
        return matrix, [str(g) for g in gene_names], "the input matrix"

    def _process_ragged(self, token_ids, expression, offsets, where, totals=None):
        """Cells from their vocabulary genes' ids and values, cell `i` at `offsets[i]:offsets[i + 1]` of the flat
        arrays; all cells at once, with no Python step per cell. Returns `(gene ids, model values, expression,
        offsets)` of the genes kept, without `<cls>`.

        As in scGPT, `normalize_total` scales over the genes in the vocabulary (scGPT drops the others first);
        `totals` are those sums, where the caller has them over whole rows with their zeros."""
        check_ragged_values(expression, offsets, where)
        cell = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        if self.normalize_total is not None:
            if totals is None:
                totals = np.array([expression[a:b].sum() for a, b in zip(offsets[:-1], offsets[1:])])
            scale = np.where(totals > 0, self.normalize_total / np.where(totals > 0, totals, 1.0), 1.0)
            expression = expression * scale[cell]
        if self.log1p:
            expression = np.log1p(expression)
        if not self.include_zero_genes:
            keep = expression > 0
            token_ids, expression, cell, offsets = _keep(keep, token_ids, expression, cell, len(offsets) - 1)
        values = bin_ragged(expression, offsets, self.n_bins).astype(np.float32) if self.binning else expression
        lengths = np.diff(offsets)
        if (lengths > self.max_genes - 1).any():
            keep = np.ones(len(expression), dtype=bool)
            for i in np.flatnonzero(lengths > self.max_genes - 1):
                # Highest-expressed first; a stable sort keeps column order among ties.
                segment = expression[offsets[i] : offsets[i + 1]]
                top = np.argsort(-segment, kind="stable")[: self.max_genes - 1]
                keep[offsets[i] : offsets[i + 1]] = np.isin(np.arange(len(segment)), top)
            (token_ids, expression, cell, offsets), values = (
                _keep(keep, token_ids, expression, cell, len(lengths)),
                values[keep],
            )
        return token_ids, values, expression, offsets

    def _process_examples(self, cells):
        """Cells from sparse examples (`gene_ids` already vocabulary ids, as the data builders yield them)."""
        if self.include_zero_genes:
            raise ValueError(
                "include_zero_genes needs a matrix: sparse examples do not say which genes were measured."
            )
        return self._process_ragged(*_ragged_examples(cells))

    def _process_matrix(self, cells, gene_names) -> list:
        """Rows from AnnData / numpy / scipy input, mapping its columns to the vocabulary."""
        matrix, names, source = self.matrix_and_genes(cells, gene_names)
        if matrix is None:
            raise ValueError(
                f"{source} is None: the AnnData has no expression matrix there; read adata.raw "
                "(use_raw) or a layer (layer) instead."
            )
        if matrix.shape[1] != len(names):
            raise ValueError(f"{source} has {matrix.shape[1]} columns but {len(names)} gene names were given.")
        if matrix.shape[0] == 0:
            raise ValueError(f"{source} has no cells.")
        # Chunked callers pass the same genes again and again; the vocabulary's identity and size are in the key so
        # that adding ids (e.g. `add_ensembl_ids`) or swapping the vocabulary invalidates it.
        vocab = self.gene_vocab
        key = (source, tuple(names), id(vocab), len(vocab.gene_to_id), len(vocab.ensembl_to_symbol))
        if getattr(self, "_mapped", (None,))[0] != key:
            token_ids, coverage = self.gene_vocab.map_genes(names)
            coverage.check(self.min_vocab_coverage, source)
            if coverage.unknown or coverage.duplicated:
                logger.warning("Gene vocabulary coverage for %s: %s", source, coverage)
            self._mapped = (key, token_ids, coverage)
        _, token_ids, coverage = self._mapped
        self.last_coverage = coverage
        columns = np.flatnonzero(token_ids >= 0)
        known_ids = token_ids[columns]

        parts = []
        # Dense conversion a chunk at a time, of at most about 4M entries (and 1,024 cells), so memory stays bounded
        # for inputs with many genes.
        step = max(1, min(1024, 2**22 // max(1, len(columns))))
        for start in range(0, matrix.shape[0], step):
            chunk = matrix[start : start + step]
            if sp.issparse(chunk) or hasattr(chunk, "toarray"):
                # Known columns first, then densify: a 60k-gene row block stays sparse until it is cut down.
                chunk = sp.csr_matrix(chunk)[:, columns].toarray()
            else:
                chunk = np.asarray(chunk)[:, columns]
            if start == 0 and (self.normalize_total is not None or self.log1p) and np.any(chunk % 1):
                logger.warning(
                    "%s holds non-integer values but normalize_total/log1p expect raw counts: the data look already "
                    "normalised. Pass a counts layer (layer='counts') or turn normalize_total and log1p off.",
                    source,
                )
            chunk = chunk.astype(np.float64)
            # Only the measured genes go on (NaN and negatives too, to be refused), unless zeros are kept.
            rows, cols = np.indices(chunk.shape).reshape(2, -1) if self.include_zero_genes else np.nonzero(chunk)
            offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(chunk)))])
            parts.append(
                self._process_ragged(
                    known_ids[cols], chunk[rows, cols], offsets, lambda i, start=start: f"cell {start + i}",
                    totals=chunk.sum(axis=1),
                )
            )  # fmt: skip
        return _concatenate_ragged(parts)

    def __call__(
        self,
        cells,
        gene_names: list[str] | None = None,
        padding: str = "longest",
        return_tensors: str | None = "pt",
        check_nonempty: bool = True,
    ) -> BatchFeature:
        r"""
        Args:
            cells: `AnnData` (reads `X`, `layer` or `.raw` as configured; counts, or log-normalised values when no
                `normalize_total`/`log1p` is asked for), a numpy array `(num_cells, num_genes)` or a scipy sparse
                matrix, a single cell as a 1-D array, or sparse examples from the data builders (a list of dicts,
                or a batch dict, with vocabulary `gene_ids` and `values`).
            gene_names (`list[str]`, *optional*): column names for array input.
            padding (`str`, defaults to `"longest"`): `"longest"` pads to the longest cell in the batch,
                `"max_length"` to `max_genes`.

        Returns:
            [`BatchFeature`] with `cell_gene_ids` (int64), `cell_values` and `cell_expression` (float32) and
            `cell_attention_mask` (int64), each `(num_cells, length)`. `cell_expression` is the value before binning
            (0 at `<cls>`), a reconstruction target.
        """
        if _is_examples(cells):
            token_ids, vals, expr, offsets = self._process_examples(cells)
        else:
            token_ids, vals, expr, offsets = self._process_matrix(cells, gene_names)
        if len(offsets) < 2:
            raise ValueError("No cells to process.")

        lengths = np.diff(offsets) + 1  # with <cls>
        empty = np.flatnonzero(lengths == 1)
        if len(empty) and check_nonempty:
            logger.warning(
                "%d of %d cells express none of the known genes (e.g. rows %s); they are kept with <cls> only.",
                len(empty),
                len(lengths),
                empty[:5].tolist(),
            )
        length = self.max_genes if padding == "max_length" else int(lengths.max())
        shape = (len(lengths), length)
        gene_ids = np.full(shape, self.gene_vocab.pad_token_id, dtype=np.int64)
        values = np.full(shape, self.pad_value, dtype=np.float32)
        expression = np.zeros(shape, dtype=np.float32)
        gene_ids[:, 0], values[:, 0] = self.gene_vocab.cls_token_id, self.cls_value
        attention_mask = (np.arange(length) < lengths[:, None]).astype(np.int64)
        cell = np.repeat(np.arange(len(lengths)), lengths - 1)
        column = np.arange(len(token_ids)) - offsets[cell] + 1
        gene_ids[cell, column], values[cell, column], expression[cell, column] = token_ids, vals, expr
        data = {
            "cell_gene_ids": gene_ids,
            "cell_values": values,
            "cell_expression": expression,
            "cell_attention_mask": attention_mask,
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __repr__(self) -> str:
        options = {k: v for k, v in self.to_dict().items() if k != "gene_vocab"}  # the vocabulary only as a summary
        return f"ScMMGPTCellProcessor({self.gene_vocab!r}, {options})"


class ScMMGPTProcessor(ProcessorMixin):
    """The cell processor, the LM's tokenizer and the Q-Former's tokenizer, as one transformers processor.

    Each `<cell>` in a text is expanded into `<cell><cell_0>...<cell_{N-1}></cell>`; the cells given alongside fill
    those spans in order. Saved and loaded by the library's `save_pretrained`/`from_pretrained`/`push_to_hub` (and
    `AutoProcessor`), as InstructBLIP's processor with its `qformer_tokenizer`: the cell processor is the
    `feature_extractor` entry of `processor_config.json`, the Q-Former's tokenizer sits in `qformer_tokenizer/`.

    Args:
        feature_extractor ([`ScMMGPTCellProcessor`]): cells to encoder inputs.
        tokenizer ([`PreTrainedTokenizerBase`]): the LM's tokenizer; the cell tokens are added if missing.
        qformer_tokenizer ([`PreTrainedTokenizerBase`], *optional*): tokenizer of the Q-Former's text path (a BERT
            tokenizer when the Q-Former was initialised from one); defaults to `tokenizer`, for a random Q-Former
            that reads the LM's tokens.
        num_cell_tokens (`int`, defaults to 32): `N`, the Q-Former's number of queries.
        chat_template (`str`, *optional*): replaces the tokenizer's chat template (and is saved with it).
    """

    def __init__(
        self,
        feature_extractor: ScMMGPTCellProcessor,
        tokenizer: PreTrainedTokenizerBase,
        qformer_tokenizer: PreTrainedTokenizerBase | None = None,
        num_cell_tokens: int = 32,
        chat_template: str | None = None,
    ):
        self.num_cell_tokens = num_cell_tokens
        self.cell_tokens = [CELL_START_TOKEN] + [cell_token(i) for i in range(num_cell_tokens)] + [CELL_END_TOKEN]
        missing = [t for t in self.cell_tokens if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        ids = tokenizer.convert_tokens_to_ids(self.cell_tokens)
        if ids[1:-1] != list(range(ids[1], ids[1] + num_cell_tokens)):
            raise ValueError("The tokenizer's <cell_i> tokens must have consecutive ids; add them in order.")
        self.cell_start_token_id, self.cell_token_id, self.cell_end_token_id = ids[0], ids[1], ids[-1]
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        if qformer_tokenizer is None:
            # A copy, not the same object: the library's save treats each sub-processor as its own (its remote-code
            # path edits and then deletes an entry in each tokenizer's init_kwargs, once per attribute).
            qformer_tokenizer = copy.deepcopy(tokenizer)
        super().__init__(feature_extractor, tokenizer, qformer_tokenizer, chat_template=tokenizer.chat_template)

    @property
    def cell_span(self) -> str:
        """`<cell><cell_0>...<cell_{N-1}></cell>`."""
        return "".join(self.cell_tokens)

    def config_token_ids(self) -> dict:
        """The `ScMMGPTConfig` fields that name the cell tokens."""
        return {
            "cell_start_token_index": self.cell_start_token_id,
            "cell_token_index": self.cell_token_id,
            "cell_end_token_index": self.cell_end_token_id,
            "num_cell_tokens": self.num_cell_tokens,
        }

    def check_model_config(self, config) -> None:
        """Refuses a model (`ScMMGPTConfig`) this processor does not belong to: other cell-token ids, another number
        of cell tokens, or another gene vocabulary ([`ScMMGPTCellProcessor.check_cell_config`])."""
        for name, value in self.config_token_ids().items():
            if getattr(config, name) != value:
                raise ValueError(
                    f"The model's {name} is {getattr(config, name)} but the processor's is {value}: the processor was "
                    "saved with another model. Load both from the same folder."
                )
        self.feature_extractor.check_cell_config(config.cell_config)

    def expand_cell_placeholders(self, text: str) -> str:
        """Replaces each bare `<cell>` with the full span; spans already expanded are left as they are."""
        return re.sub(re.escape(CELL_START_TOKEN) + r"(?!\s*" + re.escape(cell_token(0)) + ")", self.cell_span, text)

    def build_prompt(self, instruction: str, with_cell: bool = True, response: str | None = None) -> str:
        """A chat prompt (the tokenizer's chat template when it has one) whose user turn holds a `<cell>` and the
        instruction; with `response`, the assistant turn too."""
        user = f"{CELL_START_TOKEN}\n{instruction}" if with_cell else instruction
        messages = [{"role": "user", "content": user}]
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        if self.chat_template:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=response is None
            )
        prompt = f"User: {user}\nAssistant:"
        return prompt + (f" {response}{self.tokenizer.eos_token or ''}" if response is not None else "")

    def __call__(
        self,
        text: str | list[str] | None = None,
        cells=None,
        gene_names: list[str] | None = None,
        target_cells=None,
        return_tensors: str | None = "pt",
        **tokenizer_kwargs,
    ) -> BatchFeature:
        r"""
        Args:
            text (`str` or `list[str]`, *optional*): texts, each `<cell>` marking where one cell is read or written.
            cells (*optional*): cells to read, for [`ScMMGPTCellProcessor`] (AnnData, arrays or builder examples).
            target_cells (*optional*): cells the LM must write (text to cell), in the same forms. Every `<cell>`
                across the texts is one of the two: there must be as many as `cells` plus `target_cells`.

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask` (text), `cell_gene_ids`, `cell_values`,
            `cell_attention_mask` (cells) and `target_cell_gene_ids`, `target_cell_values`,
            `target_cell_attention_mask`, `target_cell_expression` (target cells).
        """
        if text is None and cells is None and target_cells is None:
            raise ValueError("Pass text, cells, target_cells, or a combination.")
        data = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            texts = [self.expand_cell_placeholders(t) for t in texts]
            n_spans = sum(t.count(cell_token(0)) for t in texts)
            n_read, n_written = self._num_cells(cells), self._num_cells(target_cells)
            if (cells is not None or target_cells is not None) and n_spans != n_read + n_written:
                raise ValueError(
                    f"The texts hold {n_spans} '<cell>' placeholders but {n_read} cells to read and {n_written} to "
                    "write were given; put one '<cell>' per cell."
                )
            tokenizer_kwargs.setdefault("padding", True)
            data.update(self.tokenizer(texts, return_tensors=return_tensors, **tokenizer_kwargs))
        if cells is not None:
            cell_inputs = self.feature_extractor(cells, gene_names=gene_names, return_tensors=return_tensors)
            # `cell_expression` is a reconstruction target, not a model input for cells that are read.
            data.update({k: v for k, v in cell_inputs.items() if k != "cell_expression"})
        if target_cells is not None:
            targets = self.feature_extractor(target_cells, gene_names=gene_names, return_tensors=return_tensors)
            data.update({f"target_{k}": v for k, v in targets.items()})  # the cells to write: target_cell_*
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _num_cells(cells) -> int:
        if cells is None:
            return 0
        if _is_examples(cells):
            if hasattr(cells, "num_rows"):
                return cells.num_rows
            return len(cells["gene_ids"]) if isinstance(cells, dict) else len(cells)
        return 1 if getattr(cells, "ndim", 2) == 1 else cells.shape[0]

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    # --- persistence: the library's, written whole, and a reader for folders saved before ---------------------------
    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """`processor_config.json` (the cell processor's options and gene vocabulary in its `feature_extractor`
        entry), whole or not at all."""
        atomic_write_text(json_file_path, self.to_json_string())

    def __repr__(self) -> str:
        config = self.to_dict()
        config.get("feature_extractor", {}).pop("gene_vocab", None)  # summarised by the cell processor's repr
        parts = "\n".join(f"- {name}: {getattr(self, name)!r}" for name in self.get_attributes())
        return f"{type(self).__name__}:\n{parts}\n\n{json.dumps(config, indent=2, sort_keys=True, default=str)}"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> ScMMGPTProcessor:
        """The library's `from_pretrained` (a folder or a Hub repo id, with its `revision`, `token`, `cache_dir`,
        ...). A folder saved before the cell processor became a feature extractor (its `processor_config.json` has
        no `feature_extractor` entry) is read by `_from_legacy_files`."""
        config_file = _resolve(pretrained_model_name_or_path, PROCESSOR_NAME, kwargs)
        if config_file is None:
            raise FileNotFoundError(
                f"{pretrained_model_name_or_path}: no {PROCESSOR_NAME}, so no scMMGPT processor was saved there; pass "
                "the model's own folder or repo id."
            )
        saved = read_json(config_file)
        if "feature_extractor" not in saved:
            return cls._from_legacy_files(pretrained_model_name_or_path, saved, kwargs)
        if kwargs.get("feature_extractor") is None:
            # The cell processor's own loader: folders saved before the vocabulary moved into the config keep it in
            # gene_vocab.json, which the library (transformers 5.25 builds a sub-processor from its nested config
            # entry alone) cannot see. Keyword arguments that name a cell processor option go to it.
            options = {k: kwargs.pop(k) for k in ScMMGPTCellProcessor.option_names() if k in kwargs}
            hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
            kwargs["feature_extractor"] = ScMMGPTCellProcessor.from_pretrained(
                pretrained_model_name_or_path, **hub, **options
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _from_legacy_files(cls, path_or_repo, saved: dict, kwargs: dict) -> ScMMGPTProcessor:
        """Folders of scMMGPT before 0.2: `cell_processor_config.json`, the LM tokenizer at the root and, when the
        Q-Former had its own, a `qformer_tokenizer/` folder."""
        hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
        subfolder = os.path.join(hub.pop("subfolder", "") or "", "qformer_tokenizer")
        has_qformer = _resolve(path_or_repo, "tokenizer_config.json", {**hub, "subfolder": subfolder}) is not None
        return cls(
            ScMMGPTCellProcessor.from_pretrained(path_or_repo, **kwargs),
            AutoTokenizer.from_pretrained(path_or_repo, **kwargs),
            AutoTokenizer.from_pretrained(path_or_repo, **hub, subfolder=subfolder) if has_qformer else None,
            num_cell_tokens=saved["num_cell_tokens"],
        )


__all__ = [
    "CELL_INPUT_NAMES",
    "GeneCoverage",
    "ScMMGPTCellProcessor",
    "ScMMGPTProcessor",
    "bin_values",
    "cell_inputs",
    "check_expression_values",
]
