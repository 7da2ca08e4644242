"""`datasets` builders that stream cell-text examples from `.h5ad` files and TileDB-SOMA experiments.

Each example is one cell: its id, its nonzero genes as vocabulary ids with their values (sparse, unpadded), the
text fields that are known, and a Cell Ontology description. Builders read in row chunks (h5ad in backed mode,
SOMA by `soma_joinid` ranges) and never load a whole matrix. Shards are row ranges, so
`datasets.distributed.split_dataset_by_node` gives each rank disjoint cells, and a stream's `state_dict()` resumes
at the chunk where it stopped.

    builder = ScMMGPTH5ADBuilder(h5ad_files=["a.h5ad", "b.h5ad"], cache_dir="cache")
    stream = builder.as_streaming_dataset("train")          # or: builder.download_and_prepare(); builder.as_dataset()
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field

import datasets
import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from datasets.builder import Key

from modeling_scmmgpt.gene_vocab import GeneCoverage, GeneVocab
from modeling_scmmgpt.resources import census_vocab_path, pbmc68k_reduced_path

from .ontology import TEXT_FIELDS, CellOntology, OntologyReport

logger = logging.getLogger(__name__)

FEATURES = datasets.Features(
    {
        "cell_id": datasets.Value("string"),
        "gene_ids": datasets.List(datasets.Value("int32")),
        "values": datasets.List(datasets.Value("float32")),
        **{name: datasets.Value("string") for name in TEXT_FIELDS},
        "description": datasets.Value("string"),
        "source": datasets.Value("string"),
    }
)


@dataclass
class ScMMGPTCellTextConfig(datasets.BuilderConfig):
    """Options of the cell-text builders.

    Args:
        h5ad_files (`list[str]` or `dict[str, list[str]]`): `.h5ad` files, or split name to files (h5ad builder).
        experiment_uris (`list[str]` or `dict[str, list[str]]`): SOMA experiments, or split name to them (SOMA).
        measurement_name (`str`, defaults to `"RNA"`), x_name (`str`, defaults to `"raw"`): SOMA matrix to read.
        gene_vocab (`str`, *optional*): a `gene_vocab.json`/scGPT `vocab.json` file or folder; defaults to scGPT's
            census vocabulary.
        gene_id_column (`str`, *optional*): `var` column with gene names (SOMA defaults to `feature_name`).
        use_raw (`bool`), layer (`str`): read `.raw.X` or a layer instead of `X` (h5ad).
        label_column (`str`, defaults to `"cell_type"`): obs column with the cell type label (after `column_map`).
        column_map (`dict`): source obs column to our text field, e.g. `{"bulk_labels": "cell_type"}`.
        constant_fields (`dict`): text fields that hold for every cell, e.g. `{"tissue": "blood"}`.
        label_to_ontology (`dict`): label to Cell Ontology id, for sources without ids.
        description_template (`str`, defaults to `"paper"`): `"paper"` or `"rich"` (see `CellOntology.describe`).
        min_vocab_coverage (`float`, defaults to 0.5): fail when fewer genes than this are in the vocabulary.
        rows_per_shard (`int`, defaults to 8192), rows_per_chunk (`int`, defaults to 1024).
        split_rows (`dict[str, list[int]]`): explicit rows per split (single source).
        stratified_split_seed (`int`, *optional*): split a single source into train/validation/test, stratified by
            label, with this seed and `split_fractions`.
    """

    h5ad_files: list | dict | None = None
    experiment_uris: list | dict | None = None
    measurement_name: str = "RNA"
    x_name: str = "raw"
    gene_vocab: str | None = None
    gene_id_column: str | None = None
    use_raw: bool = False
    layer: str | None = None
    label_column: str = "cell_type"
    column_map: dict | None = None
    constant_fields: dict | None = None
    label_to_ontology: dict | None = None
    description_template: str = "paper"
    min_vocab_coverage: float = 0.5
    rows_per_shard: int = 8192
    rows_per_chunk: int = 1024
    split_rows: dict | None = None
    stratified_split_seed: int | None = None
    split_fractions: tuple = (0.7, 0.15, 0.15)


@dataclass
class _Source:
    """One opened input: where it is, how many cells, its columns' vocabulary ids and its obs text."""

    path: str
    n_obs: int
    column_ids: np.ndarray
    texts: dict[str, np.ndarray]  # text field -> per-cell strings (None where unknown)
    cell_ids: np.ndarray
    coverage: GeneCoverage
    ontology: OntologyReport
    skipped_empty: Counter = field(default_factory=Counter)


class _CellTextBuilder(datasets.ArrowBasedBuilder):
    BUILDER_CONFIG_CLASS = ScMMGPTCellTextConfig

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description="scMMGPT cell-text examples: sparse expression with Cell Ontology text", features=FEATURES
        )

    # --- sources --------------------------------------------------------------------------------------------------
    @property
    def gene_vocab(self) -> GeneVocab:
        if getattr(self, "_gene_vocab", None) is None:
            self._gene_vocab = GeneVocab.from_pretrained(self.config.gene_vocab or census_vocab_path())
        return self._gene_vocab

    def _source_paths(self) -> dict[str, list[str]]:
        raise NotImplementedError

    def _open(self, path: str) -> _Source:
        raise NotImplementedError

    def _source(self, path: str) -> _Source:
        """Opens a source once per process (worker processes get a fresh builder without open handles)."""
        sources = self.__dict__.setdefault("_sources", {})
        if path not in sources:
            sources[path] = self._open(path)
        return sources[path]

    def __getstate__(self):
        # Open file handles do not pickle; DataLoader workers and datasets' multiprocessing reopen them.
        state = self.__dict__.copy()
        state.pop("_handles", None)
        state.pop("_sources", None)
        return state

    def _read_rows(self, path: str, rows: np.ndarray) -> sp.csr_matrix:
        raise NotImplementedError

    def _text_columns(self, obs, path: str) -> tuple[dict[str, np.ndarray], np.ndarray, OntologyReport]:
        """Per-cell text fields from an obs table, with labels resolved to Cell Ontology ids and described, and
        a report of how the labels resolved (counted per cell)."""
        config = self.config
        obs = obs.rename(columns=config.column_map or {})
        if config.label_column not in obs.columns:
            raise KeyError(
                f"{path}: obs has no {config.label_column!r} column (columns: {list(obs.columns)}); "
                "set label_column= or map a column with column_map={'your_column': 'cell_type'}."
            )
        obs = obs.rename(columns={config.label_column: "cell_type"})
        for name, value in (config.constant_fields or {}).items():
            obs[name] = value
        texts = {name: _strings(obs[name]) if name in obs.columns else np.full(len(obs), None) for name in TEXT_FIELDS}
        ontology = CellOntology.load()
        # Resolve once per distinct (label, id) pair: a million-cell file has only a few hundred.
        pairs = list(zip(texts["cell_type"], texts["cell_type_ontology_term_id"]))
        resolved, descriptions, report = {}, {}, OntologyReport()
        for (label, term_id), count in Counter(pairs).items():
            once = OntologyReport()
            given = term_id or (config.label_to_ontology or {}).get(label)
            resolved[(label, term_id)] = ontology.resolve(label, given, once)
            report.add(once, count)
        texts["cell_type_ontology_term_id"] = np.array([resolved[p] for p in pairs], dtype=object)
        keys = list(zip(*(texts[name] for name in TEXT_FIELDS)))
        for key in set(keys):
            descriptions[key] = ontology.describe(dict(zip(TEXT_FIELDS, key)), config.description_template)
        texts["description"] = np.array([descriptions[k] for k in keys], dtype=object)
        return texts, np.asarray(obs.index.astype(str), dtype=object), report

    # --- splits and shards ----------------------------------------------------------------------------------------
    def _split_generators(self, dl_manager):
        config = self.config
        paths = self._source_paths()
        sources = {p: self._source(p) for files in paths.values() for p in files}
        self.ontology_report = OntologyReport()
        for path, source in sources.items():
            self.ontology_report.add(source.ontology)
            if source.coverage.unknown or source.coverage.duplicated:
                logger.warning("%s: %s", path, source.coverage)
        logger.log(logging.WARNING if self.ontology_report.unmatched else logging.INFO, "%s", self.ontology_report)
        split_rows = config.split_rows
        if config.stratified_split_seed is not None and split_rows is None:
            split_rows = self._stratified_splits(sources)
        generators = []
        if split_rows is not None:
            (path,) = [p for files in paths.values() for p in files] or [None]
            for split, rows in split_rows.items():
                rows = np.sort(np.asarray(rows, dtype=np.int64))
                shards = [{"path": path, "rows": rows[i : i + config.rows_per_shard].tolist()}
                          for i in range(0, len(rows), config.rows_per_shard)]  # fmt: skip
                generators.append(datasets.SplitGenerator(name=split, gen_kwargs={"shards": shards}))
            return generators
        for split, files in paths.items():
            shards = [
                {"path": p, "start": start, "stop": min(start + config.rows_per_shard, sources[p].n_obs)}
                for p in files
                for start in range(0, sources[p].n_obs, config.rows_per_shard)
            ]
            generators.append(datasets.SplitGenerator(name=split, gen_kwargs={"shards": shards}))
        return generators

    def _stratified_splits(self, sources: dict[str, _Source]) -> dict[str, list[int]]:
        from sklearn.model_selection import train_test_split

        if len(sources) != 1:
            raise ValueError("stratified_split_seed splits a single source; pass split_rows or one file per split.")
        (source,) = sources.values()
        labels = source.texts["cell_type"].astype(str)
        rows = np.arange(source.n_obs)
        train_frac, val_frac, test_frac = self.config.split_fractions
        seed = self.config.stratified_split_seed
        train, rest = train_test_split(rows, train_size=train_frac, stratify=labels, random_state=seed)
        val, test = train_test_split(
            rest, test_size=test_frac / (val_frac + test_frac), stratify=labels[rest], random_state=seed
        )
        return {"train": sorted(train), "validation": sorted(val), "test": sorted(test)}

    # --- examples -------------------------------------------------------------------------------------------------
    def _generate_tables(self, shards):
        for shard_idx, shard in enumerate(shards):
            path = shard["path"]
            source = self._source(path)
            rows = np.asarray(shard["rows"]) if "rows" in shard else np.arange(shard["start"], shard["stop"])
            for chunk_idx, start in enumerate(range(0, len(rows), self.config.rows_per_chunk)):
                chunk_rows = rows[start : start + self.config.rows_per_chunk]
                table, skipped = self._table(source, chunk_rows, self._read_rows(path, chunk_rows))
                source.skipped_empty[shard_idx] += skipped
                yield Key(shard_idx, chunk_idx), table
            if source.skipped_empty[shard_idx]:
                logger.warning(
                    "%s: skipped %d cells with no expressed vocabulary genes in rows %d-%d.",
                    path, source.skipped_empty[shard_idx], rows[0], rows[-1],
                )  # fmt: skip

    def _table(self, source: _Source, rows: np.ndarray, matrix: sp.csr_matrix) -> tuple[pa.Table, int]:
        """A chunk of cells as an Arrow table of known nonzero genes, and how many cells had none (skipped)."""
        matrix = sp.csr_matrix(matrix)
        matrix.sort_indices()  # genes in column order, whatever order the file stored them in
        data = matrix.data.astype(np.float32, copy=False)
        bad = np.flatnonzero(~np.isfinite(data) | (data < 0))
        if len(bad):
            row = int(np.searchsorted(matrix.indptr, bad[0], side="right") - 1)
            kind = "a negative value" if np.isfinite(data[bad[0]]) else "a NaN or infinite value"
            raise ValueError(
                f"{source.path}, row {rows[row]} (cell {source.cell_ids[rows[row]]}): {kind} where counts or "
                "log-normalised expression are expected. Read .raw or a counts layer (use_raw=True / layer=...)."
            )
        token_ids = source.column_ids[matrix.indices]
        keep = (token_ids >= 0) & (data != 0)
        row_of = np.repeat(np.arange(len(rows)), np.diff(matrix.indptr))
        per_row = np.bincount(row_of[keep], minlength=len(rows))
        expressed = per_row > 0
        offsets = np.concatenate([[0], np.cumsum(per_row[expressed])]).astype(np.int32)
        kept_rows = rows[expressed]
        columns = {
            "cell_id": pa.array(source.cell_ids[kept_rows].tolist(), pa.string()),
            "gene_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(token_ids[keep].astype(np.int32))),
            "values": pa.ListArray.from_arrays(pa.array(offsets), pa.array(data[keep])),
        }
        for name in (*TEXT_FIELDS, "description"):
            columns[name] = pa.array(source.texts[name][kept_rows].tolist(), pa.string())
        columns["source"] = pa.array([os.path.basename(source.path)] * len(kept_rows), pa.string())
        return pa.table(columns, schema=FEATURES.arrow_schema), int((~expressed).sum())


class ScMMGPTH5ADBuilder(_CellTextBuilder):
    """Cell-text examples from one or many `.h5ad` files, read in backed mode.

    The `pbmc68k_reduced` config is the embedded demo: scanpy's 700 real PBMCs (log-normalised `.raw`), their
    `bulk_labels` mapped to Cell Ontology, split 70/15/15 stratified by type with seed 0.
    """

    BUILDER_CONFIGS = [
        ScMMGPTCellTextConfig(name="default"),
        ScMMGPTCellTextConfig(
            name="pbmc68k_reduced",
            use_raw=True,
            column_map={"bulk_labels": "cell_type"},
            constant_fields={"tissue": "blood", "disease": "normal"},
            stratified_split_seed=0,
            min_vocab_coverage=0.5,
        ),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _source_paths(self) -> dict[str, list[str]]:
        files = self.config.h5ad_files
        if files is None and self.config.name == "pbmc68k_reduced":
            files = [pbmc68k_reduced_path()]
        if self.config.name == "pbmc68k_reduced" and self.config.label_to_ontology is None:
            from .pbmc import PBMC_LABEL_TO_CELL_ONTOLOGY

            self.config.label_to_ontology = PBMC_LABEL_TO_CELL_ONTOLOGY
        if not files:
            raise ValueError("Pass h5ad_files=[...] (or {'train': [...], ...}) to ScMMGPTH5ADBuilder.")
        return {"train": list(files)} if isinstance(files, (list, tuple, str)) and not isinstance(files, dict) else {
            split: list(f) for split, f in files.items()
        }

    def _backed(self, path: str):
        import anndata as ad

        handles = self.__dict__.setdefault("_handles", {})
        if path not in handles:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no such .h5ad file.")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    handles[path] = ad.read_h5ad(path, backed="r")
            except Exception as err:  # h5py raises OSError, KeyError or ValueError on damaged files
                raise ValueError(f"{path} is not a readable .h5ad file ({type(err).__name__}: {err}); it may be "
                                 "truncated or corrupt.") from err  # fmt: skip
        return handles[path]

    def _matrix(self, adata):
        if self.config.use_raw:
            if adata.raw is None:
                raise ValueError(f"{adata.filename}: use_raw=True but the file has no .raw.")
            return adata.raw.X, list(adata.raw.var_names) if self.config.gene_id_column is None else list(
                adata.raw.var[self.config.gene_id_column].astype(str)
            )
        matrix = adata.layers[self.config.layer] if self.config.layer else adata.X
        var = adata.var
        names = list(adata.var_names) if self.config.gene_id_column is None else list(var[self.config.gene_id_column].astype(str))
        return matrix, names

    def _open(self, path: str) -> _Source:
        adata = self._backed(path)
        if adata.n_obs == 0:
            raise ValueError(f"{path} has no cells.")
        matrix, names = self._matrix(adata)
        column_ids, coverage = self.gene_vocab.map_genes(names)
        coverage.check(self.config.min_vocab_coverage, path)
        texts, cell_ids, ontology = self._text_columns(adata.obs, path)
        return _Source(path, adata.n_obs, column_ids, texts, cell_ids, coverage, ontology)

    def _read_rows(self, path: str, rows: np.ndarray) -> sp.csr_matrix:
        matrix, _ = self._matrix(self._backed(path))
        contiguous = rows[-1] - rows[0] + 1 == len(rows)
        block = matrix[int(rows[0]) : int(rows[-1]) + 1] if contiguous else matrix[rows.tolist()]
        return block if sp.issparse(block) else sp.csr_matrix(np.asarray(block))


class ScMMGPTSomaBuilder(_CellTextBuilder):
    """Cell-text examples from TileDB-SOMA experiments in the CELLxGENE Census schema (obs `cell_type`,
    `cell_type_ontology_term_id`, `tissue`, `disease`, `sex`, `development_stage`; var `feature_name`/`feature_id`),
    read by `soma_joinid` ranges."""

    def _source_paths(self) -> dict[str, list[str]]:
        uris = self.config.experiment_uris
        if not uris:
            raise ValueError("Pass experiment_uris=[...] (or {'train': [...], ...}) to ScMMGPTSomaBuilder.")
        return {"train": list(uris)} if not isinstance(uris, dict) else {s: list(u) for s, u in uris.items()}

    def _experiment(self, uri: str):
        import tiledbsoma

        handles = self.__dict__.setdefault("_handles", {})
        if uri not in handles:
            if not tiledbsoma.Experiment.exists(uri):
                raise FileNotFoundError(f"{uri}: no TileDB-SOMA experiment there.")
            handles[uri] = tiledbsoma.Experiment.open(uri)
        return handles[uri]

    def _open(self, uri: str) -> _Source:
        experiment = self._experiment(uri)
        measurement = experiment.ms[self.config.measurement_name]
        var = measurement.var.read().concat().to_pandas().sort_values("soma_joinid")
        names = var[self.config.gene_id_column or "feature_name"].astype(str).tolist()
        column_ids, coverage = self.gene_vocab.map_genes(names)
        coverage.check(self.config.min_vocab_coverage, uri)
        obs = experiment.obs.read().concat().to_pandas().sort_values("soma_joinid")
        if len(obs) == 0:
            raise ValueError(f"{uri} has no cells.")
        if not np.array_equal(obs["soma_joinid"].to_numpy(), np.arange(len(obs))):
            raise ValueError(f"{uri}: obs soma_joinids are not 0..n-1; read a filtered copy of the experiment.")
        obs = obs.set_index("obs_id" if "obs_id" in obs.columns else "soma_joinid")
        texts, cell_ids, ontology = self._text_columns(obs, uri)
        return _Source(uri, len(obs), column_ids, texts, cell_ids, coverage, ontology)

    def _read_rows(self, uri: str, rows: np.ndarray) -> sp.csr_matrix:
        matrix = self._experiment(uri).ms[self.config.measurement_name].X[self.config.x_name]
        first, last = int(rows[0]), int(rows[-1])
        table = matrix.read(coords=(slice(first, last),)).tables().concat()
        dim0 = table["soma_dim_0"].to_numpy() - first
        n_var = matrix.shape[1]
        block = sp.csr_matrix((table["soma_data"].to_numpy(), (dim0, table["soma_dim_1"].to_numpy())),
                              shape=(last - first + 1, n_var))  # fmt: skip
        return block[rows - first]


def _strings(column) -> np.ndarray:
    values = column.astype(object).where(column.notna(), None).to_numpy()
    return np.array([None if v is None else str(v) for v in values], dtype=object)


__all__ = ["FEATURES", "ScMMGPTCellTextConfig", "ScMMGPTH5ADBuilder", "ScMMGPTSomaBuilder"]
