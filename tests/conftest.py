"""Shared fixtures: real PBMC cells from scanpy's package data, a gene vocabulary cut from scGPT's census vocab, and
a tokenizer trained here (nothing is downloaded)."""

import os
import warnings

import anndata as ad
import numpy as np
import pytest
import torch

from modeling_scmmgpt import GeneVocab, ScMMGPTCellProcessor
from modeling_scmmgpt.resources import census_vocab_path, pbmc68k_reduced_path
from trainers.default_model import train_word_tokenizer


SENTENCES = [
    "cell type: CD14-positive monocyte. A monocyte that expresses CD14 and is found in blood.",
    "cell type: B cell. A lymphocyte of B lineage capable of B cell mediated immunity.",
    "cell type: natural killer cell. A lymphocyte that can spontaneously kill a variety of target cells.",
    "cell type: regulatory T cell. A CD4-positive T cell that suppresses immune responses.",
    "cell type: dendritic cell. A cell of hematopoietic origin that presents antigen.",
    "Describe this cell. Which cell type is this? Generate a cell of type monocyte from tissue blood.",
]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses real shipped weights (SmolLM2, MiniLM); run in CI")


def pbmc_cells() -> ad.AnnData:
    """700 real PBMCs; `.raw` holds log-normalised expression of 765 genes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ad.read_h5ad(pbmc68k_reduced_path())


@pytest.fixture(scope="session")
def pbmc() -> ad.AnnData:
    return pbmc_cells()


@pytest.fixture(scope="session")
def census_vocab() -> GeneVocab:
    return GeneVocab.from_scgpt_json(census_vocab_path())


@pytest.fixture(scope="session")
def pbmc_vocab(pbmc, census_vocab) -> GeneVocab:
    """The census-vocabulary genes that PBMC measures, renumbered so a tiny encoder can hold them."""
    genes = [g for g in pbmc.raw.var_names if g in census_vocab]
    return GeneVocab.from_genes(genes)


@pytest.fixture(scope="session")
def pbmc_cell_processor(pbmc_vocab) -> ScMMGPTCellProcessor:
    return ScMMGPTCellProcessor(pbmc_vocab, max_genes=64, use_raw=True)


def make_tokenizer():
    """A word-level tokenizer trained in-process on a few cell descriptions."""
    return train_word_tokenizer(SENTENCES)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(scope="session")
def oracle():
    """Reference inputs and outputs made by scGPT 0.2.4's own code (copied from shared/scgpt_oracle; see its README)."""
    directory = os.path.join(os.path.dirname(__file__), "fixtures", "scgpt_oracle")
    return {
        "io": torch.load(os.path.join(directory, "scgpt_tiny_io.pt"), weights_only=True),
        "state": torch.load(os.path.join(directory, "scgpt_tiny_state.pt"), weights_only=True),
        "state_flashkeys": torch.load(os.path.join(directory, "scgpt_tiny_state_flashkeys.pt"), weights_only=True),
    }


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """`scmmgpt demo --fast` once per test session: its model serves the CLI and the web-app tests."""
    from scmmgpt.cli import main

    if os.environ.get("SCMMGPT_TEST_DEMO_DIR"):  # a finished `demo --fast` folder, to iterate on its tests locally
        from pathlib import Path

        return Path(os.environ["SCMMGPT_TEST_DEMO_DIR"])
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--fast", "--output-dir", str(out)]) == 0
    return out


def tiny_demo(cache_dir):
    """A tiny untrained scMMGPT over the PBMC genes (48 genes per cell) and the PBMC demo splits with its gene ids."""
    from trainers.data import load_pbmc_demo
    from trainers.default_model import build_model

    torch.manual_seed(0)
    model, processor = build_model(pbmc_cells(), tiny_lm=True)
    processor.feature_extractor.max_genes = 48
    return (
        model,
        processor,
        load_pbmc_demo(gene_vocab=processor.feature_extractor.gene_vocab, cache_dir=str(cache_dir)),
    )
