"""Loading cell-text splits: the user's `.h5ad` files or TileDB-SOMA experiments (`load_cell_text_splits`), or the
embedded default, scanpy's 700 real PBMCs (10x Genomics PBMC 68k, reduced; 10 FACS-sorted types)."""

from __future__ import annotations

import glob
import hashlib
import json
import os

import datasets

from modeling_scmmgpt.resources import pbmc68k_reduced_path

from .builders import ScMMGPTH5ADBuilder, ScMMGPTSomaBuilder


def load_pbmc():
    """The embedded PBMCs as an AnnData (log-normalised `.raw`, `bulk_labels`)."""
    import warnings

    import anndata as ad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notes about the file's old format
        return ad.read_h5ad(pbmc68k_reduced_path())


def load_pbmc_demo(
    streaming: bool = False, cache_dir: str | None = None, seed: int = 0, gene_vocab=None, **config_kwargs
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """One call to the demo's train/validation/test splits (70/15/15, stratified by cell type, fixed `seed`).

    Equivalent to `ScMMGPTH5ADBuilder(config_name="pbmc68k_reduced", split_seed=seed)`. `gene_vocab` is a
    vocabulary file or folder, or a [`GeneVocab`] (e.g. a model's `processor.feature_extractor.gene_vocab`, so that
    the examples' gene ids are that model's). Further `ScMMGPTCellTextConfig` options (e.g.
    `description_template="rich"`) pass through.
    """
    builder = ScMMGPTH5ADBuilder(
        config_name="pbmc68k_reduced",
        cache_dir=cache_dir,
        split_seed=seed,
        gene_vocab=_vocab_path(gene_vocab, cache_dir),
        **config_kwargs,
    )
    return _splits(builder, streaming)


def load_cell_text_splits(data_args, gene_vocab, seed: int = 0):
    """Train/validation/test splits of the cells `data_args` ([`ScMMGPTDataArguments`]) names, with gene ids of
    `gene_vocab` (the model's), or the embedded PBMC demo when it names none. Sources and columns are checked when
    the builder opens them, before any training: a missing column, no genes in common with the vocabulary, a label
    column without labels, or a filter that selects nothing is a one-line error."""
    if data_args.uses_demo_data:
        return load_pbmc_demo(
            streaming=data_args.streaming,
            cache_dir=data_args.data_cache_dir,
            seed=seed,
            gene_vocab=gene_vocab,
            description_template=data_args.description_template,
        )
    named = {"train": data_args.train_data, "validation": data_args.validation_data, "test": data_args.test_data}
    files = {split: expand_sources(sources) for split, sources in named.items() if sources}
    every = [f for split_files in files.values() for f in split_files]
    soma = [not f.endswith(".h5ad") for f in every]
    if any(soma) and not all(soma):
        raise ValueError(
            "Mix of .h5ad files and TileDB-SOMA experiments; train on one kind (convert with "
            "tiledbsoma.io.from_h5ad or to_anndata)."
        )
    column_map = {
        column: field
        for column, field in (
            (data_args.ontology_id_column, "cell_type_ontology_term_id"),
            (data_args.tissue_column, "tissue"),
            (data_args.disease_column, "disease"),
        )
        if column
    }
    config = dict(
        gene_vocab=_vocab_path(gene_vocab, data_args.data_cache_dir),
        gene_id_column=data_args.gene_column,
        label_column=data_args.label_column,
        column_map=column_map or None,
        obs_filter=data_args.obs_filter,
        min_vocab_coverage=data_args.min_vocab_coverage,
        description_template=data_args.description_template,
    )
    if len(files) == 1:  # train_data only: split it
        config.update(
            split_seed=seed,
            split_fractions=tuple(data_args.split_fractions),
            split_group_column=data_args.donor_column,
        )
    sources = files["train"] if len(files) == 1 else files
    if all(soma):
        if data_args.layer:
            config["x_name"] = data_args.layer
        builder = ScMMGPTSomaBuilder(cache_dir=data_args.data_cache_dir, experiment_uris=sources, **config)
    else:
        builder = ScMMGPTH5ADBuilder(
            cache_dir=data_args.data_cache_dir,
            h5ad_files=sources,
            use_raw=data_args.use_raw,
            layer=data_args.layer,
            **config,
        )
    return _splits(builder, data_args.streaming)


def expand_sources(sources: list[str]) -> list[str]:
    """Files and globs to sorted paths (SOMA URIs pass through); a pattern or path that matches nothing is an error."""
    paths = []
    for source in sources:
        if "://" in source:  # s3://, tiledb://: a remote SOMA experiment
            paths.append(source)
        elif glob.has_magic(source):
            matched = sorted(glob.glob(source))
            if not matched:
                raise FileNotFoundError(f"{source}: no file matches this pattern.")
            paths += matched
        elif not os.path.exists(source):
            raise FileNotFoundError(f"{source}: no such file or SOMA experiment.")
        else:
            paths.append(source)
    return list(dict.fromkeys(paths))


def _splits(builder, streaming: bool):
    if streaming:
        return builder.as_streaming_dataset()
    builder.download_and_prepare()
    return builder.as_dataset()


def _vocab_path(gene_vocab, cache_dir: str | None) -> str | None:
    if gene_vocab is None or isinstance(gene_vocab, (str, os.PathLike)):
        return gene_vocab
    return _saved_vocab_path(gene_vocab, cache_dir)


def _saved_vocab_path(gene_vocab, cache_dir: str | None) -> str:
    """The vocabulary as a file named by its content, under the datasets cache: the path outlives this call (streams
    and worker processes read it later) and stays the same for the same vocabulary, so the prepared dataset is
    reused instead of rebuilt."""
    from modeling_scmmgpt.utils import atomic_write_text

    text = json.dumps(gene_vocab.to_dict(), sort_keys=True)
    root = os.path.join(cache_dir or datasets.config.HF_DATASETS_CACHE, "scmmgpt_gene_vocabs")
    path = os.path.join(root, hashlib.sha256(text.encode()).hexdigest()[:16] + ".json")
    if not os.path.isfile(path):
        os.makedirs(root, exist_ok=True)
        atomic_write_text(path, text)
    return path
