"""The embedded demo: scanpy's 700 real PBMCs (10x Genomics PBMC 68k, reduced), 10 FACS-sorted types."""

from __future__ import annotations

import hashlib
import json
import os

import datasets

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


def load_pbmc_demo(
    streaming: bool = False, cache_dir: str | None = None, seed: int = 0, gene_vocab=None, **config_kwargs
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """One call to the demo's train/validation/test splits (70/15/15, stratified by cell type, fixed `seed`).

    Equivalent to `ScMMGPTH5ADBuilder(config_name="pbmc68k_reduced", stratified_split_seed=seed)`. `gene_vocab` is a
    vocabulary file or folder, or a [`GeneVocab`] (e.g. a model's `processor.cell_processor.gene_vocab`, so that
    the examples' gene ids are that model's). Further `ScMMGPTCellTextConfig` options (e.g.
    `description_template="rich"`) pass through.
    """
    from .builders import ScMMGPTH5ADBuilder

    if gene_vocab is not None and not isinstance(gene_vocab, (str, os.PathLike)):
        gene_vocab = _saved_vocab_path(gene_vocab, cache_dir)
    builder = ScMMGPTH5ADBuilder(
        config_name="pbmc68k_reduced", cache_dir=cache_dir, stratified_split_seed=seed, gene_vocab=gene_vocab,
        **config_kwargs,
    )  # fmt: skip
    if streaming:
        return builder.as_streaming_dataset()
    builder.download_and_prepare()
    return builder.as_dataset()


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
