"""A catalogue of bad inputs and faults, each run for real: data files, model folders, pipeline options, CLI calls,
training configs and disk faults (a full disk, kill -9).

Every case asserts the class of its outcome: either a clear error that names the problem (one line and a hint from
the CLI, no traceback), or a warning plus correct handling. Every CLI case also asserts that nothing is left at the
final output path and that the input file is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
import yaml
from conftest import pbmc_cells

from scmmgpt.cli import main


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- fixtures: one small saved model and one small input file --------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from trainers.default_model import build_model

    torch.manual_seed(0)
    model, processor = build_model(pbmc_cells(), tiny_lm=True)
    path = tmp_path_factory.mktemp("model") / "model"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def loaded(model_dir):
    from modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTProcessor

    return ScMMGPTForConditionalGeneration.from_pretrained(model_dir).eval(), ScMMGPTProcessor.from_pretrained(
        model_dir
    )


@pytest.fixture
def cells(tmp_path):
    """12 PBMCs (log-normalised values in .raw, as the model reads them) in a fresh file per test."""
    path = tmp_path / "cells.h5ad"
    pbmc_cells()[:12].copy().write_h5ad(path)
    return str(path)


def _digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    return code, capsys.readouterr().err


def _one_line_error(code: int, err: str, pattern: str) -> None:
    """Exit code 2, one `scmmgpt ...: error:` line matching `pattern`, one `hint:` line, no traceback (progress
    bars aside)."""
    lines = [line for line in err.strip().splitlines() if line.strip() and "it/s]" not in line and "%|" not in line]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 2 and lines[0].startswith("scmmgpt") and ": error: " in lines[0], err
    assert lines[1].startswith("hint: "), err
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"


def _check_cli_case(argv, pattern, capsys, inputs=(), outputs=()):
    before = {p: _digest(p) for p in inputs if os.path.isfile(p)}
    code, err = _cli(argv, capsys)
    _one_line_error(code, err, pattern)
    for path, digest in before.items():
        assert _digest(path) == digest, f"{path} changed"
    for path in outputs:
        if path not in before:
            assert not os.path.exists(path), f"{path} was left behind"


# --- 1. data files (through `scmmgpt embed`) -------------------------------------------------------------------------
def _write(adata, path):
    adata.write_h5ad(path)
    return str(path)


def _cells_where(tmp_path, change):
    adata = pbmc_cells()[:12].copy()
    changed = change(adata)
    return _write(adata if changed is None else changed, tmp_path / "bad.h5ad")


def _raw_with(adata, x):
    raw = adata.raw.to_adata()
    raw.X = x
    adata.raw = raw


def _dense_raw(adata):
    return adata.raw.X.toarray() if sp.issparse(adata.raw.X) else np.array(adata.raw.X)


def _nan(adata):
    x = _dense_raw(adata)
    x[2, 5] = np.nan
    _raw_with(adata, x)


def _inf(adata):
    x = _dense_raw(adata)
    x[3, 7] = np.inf
    _raw_with(adata, x)


def _negative(adata):
    x = _dense_raw(adata)
    x[1, 1] = -2.5
    _raw_with(adata, x)


def _sparse_nan(adata):
    x = sp.csr_matrix(_dense_raw(adata))
    x.data[0] = np.nan
    _raw_with(adata, x)


def _scaled(adata):  # z-scored values, as sc.pp.scale leaves them
    x = _dense_raw(adata)
    _raw_with(adata, (x - x.mean(0)) / (x.std(0) + 1e-6))


def _no_raw(adata):
    adata.raw = None


def _no_x(adata):
    return ad.AnnData(obs=adata.obs, var=adata.var)


def _zero_cells(adata):
    return adata[:0].copy()


def _unknown_genes(adata):
    raw = adata.raw.to_adata()
    raw.var_names = [f"NOT_A_GENE_{i}" for i in range(raw.n_vars)]
    adata.raw = raw


def _ensembl_genes(adata):
    raw = adata.raw.to_adata()
    raw.var_names = [f"ENSG{i:011d}" for i in range(raw.n_vars)]
    adata.raw = raw


def _few_model_genes(adata):  # a wide input that measures few of the model's genes
    raw = adata.raw.to_adata()
    names = list(raw.var_names)
    raw.var_names = [n if i < 200 else f"NOT_A_GENE_{i}" for i, n in enumerate(names)]
    adata.raw = raw


DATA_CASES = [
    ("nan value", _nan, [], r"NaN"),
    ("infinite value", _inf, [], r"inf"),
    ("negative value", _negative, [], r"negative"),
    ("NaN in a sparse matrix", _sparse_nan, [], r"NaN"),
    ("scaled (z-scored) values", _scaled, [], r"negative"),
    ("model reads .raw, file has none", _no_raw, [], r"adata\.raw is empty"),
    ("no X at all", _no_x, ["--no-use-raw"], r"no expression matrix|X is None|has no X"),
    ("zero cells", _zero_cells, [], r"has no cells"),
    ("no gene the model knows", _unknown_genes, [], r"not in the vocabulary|measures 0 of the model"),
    ("Ensembl ids without aliases", _ensembl_genes, [], r"measures 0 of the model|not in the vocabulary"),
    ("few of the model's genes", _few_model_genes, [], r"measures \d+ of the model's \d+ genes"),
    (
        "missing gene id column",
        lambda a: None,
        ["--gene-id-column", "feature_name"],
        r"feature_name.*not a var column",
    ),
    ("missing layer", lambda a: None, ["--layer", "counts"], r"counts.*not in adata\.layers"),
    (
        "layer and raw both asked for",
        lambda a: a.layers.__setitem__("lognorm", a.X.copy()),
        ["--layer", "lognorm", "--use-raw"],
        r"use_raw.*layer|layer.*use_raw",
    ),
]


def _embed_argv(model_dir, source, tmp_path, *options):
    """`scmmgpt embed` of `source` into `tmp_path/out.h5ad`: (argv, output path)."""
    output = str(tmp_path / "out.h5ad")
    return ["embed", "--model", model_dir, "--input", str(source), "--output", output, *options], output


def _embed_refused(model_dir, source, tmp_path, capsys, pattern, *options):
    """`scmmgpt embed` of `source` fails in one line matching `pattern`, leaves `source` as it was, writes nothing."""
    argv, output = _embed_argv(model_dir, source, tmp_path, *options)
    _check_cli_case(argv, pattern, capsys, inputs=[str(source)], outputs=[output])


@pytest.mark.parametrize("name, change, extra, pattern", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(name, change, extra, pattern, model_dir, tmp_path, capsys):
    _embed_refused(model_dir, _cells_where(tmp_path, change), tmp_path, capsys, pattern, *extra)


def test_not_an_h5ad_file(model_dir, tmp_path, capsys):
    for name, content in (("text.h5ad", b"cell,gene\n1,2\n"), ("empty.h5ad", b"")):
        source = tmp_path / name
        source.write_bytes(content)
        _embed_refused(model_dir, source, tmp_path, capsys, r"not a readable \.h5ad file")


def test_truncated_h5ad_file(model_dir, cells, tmp_path, capsys):
    source = tmp_path / "truncated.h5ad"
    data = open(cells, "rb").read()
    source.write_bytes(data[: len(data) // 2])
    _embed_refused(model_dir, source, tmp_path, capsys, r"not a readable \.h5ad file")


def test_missing_input_file(model_dir, tmp_path, capsys):
    _embed_refused(model_dir, tmp_path / "nope.h5ad", tmp_path, capsys, r"nope\.h5ad: no such file")


def test_low_coverage_passes_with_a_lower_threshold(model_dir, tmp_path, capsys):
    """The coverage refusal names the fix, and the fix works: --min-vocab-coverage."""
    source = _cells_where(tmp_path, _few_model_genes)
    argv, output = _embed_argv(model_dir, source, tmp_path, "--min-vocab-coverage", "0.2")
    code, err = _cli(argv, capsys)
    assert code == 0, err
    assert ad.read_h5ad(output).obsm["X_scmmgpt"].shape[0] == 12


def test_layer_overrides_a_saved_use_raw(model_dir, tmp_path, capsys):
    """A model saved with use_raw=True reads a named layer when --layer is given (no .raw needed)."""
    adata = pbmc_cells()[:12].copy()
    adata = ad.AnnData(X=adata.raw.X.copy(), obs=adata.obs, var=adata.raw.var)
    adata.layers["lognorm"] = adata.X.copy()
    adata.X = sp.csr_matrix(adata.X.shape, dtype=np.float32)  # X itself holds nothing useful
    source = _write(adata, tmp_path / "layered.h5ad")
    argv, output = _embed_argv(model_dir, source, tmp_path, "--layer", "lognorm")
    code, err = _cli(argv, capsys)
    assert code == 0, err
    assert np.isfinite(ad.read_h5ad(output).obsm["X_scmmgpt"]).all()


# --- 2. model folders ----------------------------------------------------------------------------------------------
def _edit_json(path, change):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    change(data)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _missing_key(folder):
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors.pop("model.multi_modal_projector.linear_1.weight")
    save_file(tensors, path, metadata={"format": "pt"})


def _extra_key(folder):
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["model.surprise.weight"] = torch.zeros(2)
    save_file(tensors, path, metadata={"format": "pt"})


def _wrong_shape(folder):
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["model.multi_modal_projector.linear_1.bias"] = torch.zeros(3)
    save_file(tensors, path, metadata={"format": "pt"})


def _truncate(folder):
    path = os.path.join(folder, "model.safetensors")
    os.truncate(path, os.path.getsize(path) // 2)


def _pickle_only(folder):
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save({"x": torch.zeros(1)}, os.path.join(folder, "pytorch_model.bin"))


def _swap_two_genes(folder):
    def swap(vocab):
        genes = list(vocab["gene_to_id"])
        a, b = genes[0], genes[1]
        vocab["gene_to_id"][a], vocab["gene_to_id"][b] = vocab["gene_to_id"][b], vocab["gene_to_id"][a]

    _edit_vocab(folder, swap)


def _grow_vocab(folder):
    def grow(vocab):
        top = max(vocab["gene_to_id"].values())
        vocab["gene_to_id"].update({f"EXTRA{i}": top + 1 + i for i in range(5)})

    _edit_vocab(folder, grow)


def _edit_vocab(folder, edit):
    """Edits the gene vocabulary saved in the processor's config (its `feature_extractor` entry)."""
    _edit_json(os.path.join(folder, "processor_config.json"), lambda c: edit(c["feature_extractor"]["gene_vocab"]))


MODEL_CASES = [
    ("folder does not exist", lambda f: shutil.rmtree(f), r"not a saved scMMGPT model folder"),
    ("no config.json", lambda f: os.remove(os.path.join(f, "config.json")), r"not a saved scMMGPT model folder"),
    (
        "config.json of a Llama",
        lambda f: _edit_json(
            os.path.join(f, "config.json"),
            lambda c: (c.clear(), c.update(model_type="llama", hidden_size=4096, num_hidden_layers=32)),
        ),
        r"model_type 'llama', not 'scmmgpt'",
    ),
    (
        "config.json without model_type",
        lambda f: _edit_json(os.path.join(f, "config.json"), lambda c: c.pop("model_type")),
        r"model_type None, not 'scmmgpt'",
    ),
    (
        "config.json not JSON",
        lambda f: open(os.path.join(f, "config.json"), "w").write("{oops"),
        r"config.json.*not a valid JSON",
    ),
    (
        "config.json with an unknown field type",
        lambda f: _edit_json(os.path.join(f, "config.json"), lambda c: c.update(num_cell_tokens="eight")),
        r"num_cell_tokens",
    ),
    ("truncated safetensors", _truncate, r"model: the safetensors weights are truncated or corrupt"),
    ("pickle-only weights", _pickle_only, r"only pickled weights: pytorch_model\.bin.*safetensors only"),
    ("no weights", lambda f: os.remove(os.path.join(f, "model.safetensors")), r"no model\.safetensors"),
    ("a weight missing", _missing_key, r"1 missing keys \(e\.g\. model\.multi_modal_projector\.linear_1\.weight\)"),
    ("an extra weight", _extra_key, r"1 unexpected keys \(e\.g\. model\.surprise\.weight\)"),
    ("a weight of the wrong shape", _wrong_shape, r"mismatched keys|size mismatch|shape"),
    ("gene vocabulary permuted", _swap_two_genes, r"gene vocabulary \(fingerprint [0-9a-f]+\) is not the one"),
    ("gene vocabulary past the embeddings", _grow_vocab, r"ids up to \d+, but the model has \d+ gene embeddings"),
    (
        "gene vocabulary missing",
        lambda f: _edit_json(
            os.path.join(f, "processor_config.json"), lambda c: c["feature_extractor"].pop("gene_vocab")
        ),
        r"No gene vocabulary",
    ),
    (
        "gene vocabulary without its genes",
        lambda f: _edit_vocab(f, lambda vocab: vocab.pop("gene_to_id")),
        r"gene vocabulary.*no 'gene_to_id'",
    ),
    (
        "processor's cell tokens differ",
        lambda f: _edit_json(os.path.join(f, "processor_config.json"), lambda c: c.update(num_cell_tokens=4)),
        r"num_cell_tokens is 8 but the processor's is 4",
    ),
    (
        "processor config missing",
        lambda f: os.remove(os.path.join(f, "processor_config.json")),
        r"processor_config\.json",
    ),
    (
        "unknown cell-processor option",
        lambda f: _edit_json(
            os.path.join(f, "processor_config.json"), lambda c: c["feature_extractor"].update(max_gene=10)
        ),
        r"unknown option 'max_gene' \(did you mean 'max_genes'\?\)",
    ),
    (
        "cell-processor config missing",
        lambda f: _edit_json(os.path.join(f, "processor_config.json"), lambda c: c.pop("feature_extractor")),
        r"no preprocessor_config\.json \(nor the older cell_processor_config\.json\)",
    ),
    (
        "cell token ids moved",
        lambda f: _edit_json(
            os.path.join(f, "config.json"), lambda c: c.update(cell_token_index=c["cell_token_index"] + 1)
        ),
        r"cell_token_index is \d+ but the processor's is",
    ),
]


@pytest.mark.parametrize("name, break_folder, pattern", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_folder(name, break_folder, pattern, model_dir, cells, tmp_path, capsys):
    folder = str(tmp_path / "model")
    shutil.copytree(model_dir, folder)
    break_folder(folder)
    _embed_refused(folder, cells, tmp_path, capsys, pattern)


def test_library_refuses_mismatched_parts_before_reading_cells(loaded, model_dir, tmp_path):
    """The same checks hold for the library: pipelines refuse a processor of another model when they are built."""
    from modeling_scmmgpt import ScMMGPTProcessor
    from modeling_scmmgpt.pipelines import CellFeatureExtractionPipeline, TextToCellPipeline

    model, _ = loaded
    folder = str(tmp_path / "model")
    shutil.copytree(model_dir, folder)
    _swap_two_genes(folder)
    other = ScMMGPTProcessor.from_pretrained(folder)
    for cls in (CellFeatureExtractionPipeline, TextToCellPipeline):
        with pytest.raises(ValueError, match="fingerprint"):
            cls(model=model, processor=other, task=None)
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        ScMMGPTProcessor.from_pretrained(str(tmp_path / "not" / "there"))


# --- 3. pipeline options ---------------------------------------------------------------------------------------------
def _pipe(loaded, cls_name):
    import modeling_scmmgpt.pipelines as pipelines

    model, processor = loaded
    return getattr(pipelines, cls_name)(model=model, processor=processor, task=None)


CELLS = pbmc_cells()[:4].copy()

PIPELINE_ERRORS = [
    ("batch_size 0", "CellFeatureExtractionPipeline", dict(batch_size=0), ValueError, r"batch_size=0"),
    ("batch_size negative", "CellFeatureExtractionPipeline", dict(batch_size=-1), ValueError, r"batch_size=-1"),
    (
        "top_k 0",
        "CellTypeAnnotationPipeline",
        dict(candidate_labels=["B cell", "T cell"], top_k=0),
        ValueError,
        r"top_k=0",
    ),
    (
        "top_k negative",
        "CellTypeAnnotationPipeline",
        dict(candidate_labels=["B cell"], top_k=-2),
        ValueError,
        r"top_k=-2",
    ),
    (
        "top_k not whole",
        "CellTypeAnnotationPipeline",
        dict(candidate_labels=["B cell"], top_k=1.5),
        ValueError,
        r"top_k=1\.5",
    ),
    ("no candidate labels", "CellTypeAnnotationPipeline", dict(candidate_labels=[]), ValueError, r"candidate"),
    (
        "empty candidate label",
        "CellTypeAnnotationPipeline",
        dict(candidate_labels=["B cell", ""]),
        ValueError,
        r"empty",
    ),
    (
        "unknown CL id",
        "CellTypeAnnotationPipeline",
        dict(candidate_labels=["CL:9999999", "B cell"]),
        ValueError,
        r"CL:9999999",
    ),
    (
        "unknown annotation mode",
        "CellTypeAnnotationPipeline",
        dict(candidate_labels=["B cell"], mode="semi"),
        ValueError,
        r"semi",
    ),
    ("max_new_tokens 0", "CellDescriptionPipeline", dict(max_new_tokens=0), ValueError, r"max_new_tokens=0"),
    (
        "max_new_tokens not whole",
        "CellDescriptionPipeline",
        dict(max_new_tokens=2.5),
        ValueError,
        r"max_new_tokens=2\.5",
    ),
    (
        "write_to_adata and output_file",
        "CellFeatureExtractionPipeline",
        dict(write_to_adata=True, output_file="x.npy"),
        ValueError,
        r"either write_to_adata or output_file",
    ),
    ("embeddings to a CSV", "CellFeatureExtractionPipeline", dict(output_file="{tmp}/x.csv"), ValueError, r"\.npy"),
]


@pytest.mark.parametrize(
    "name, cls_name, options, error, pattern", PIPELINE_ERRORS, ids=[c[0] for c in PIPELINE_ERRORS]
)
def test_bad_pipeline_option(name, cls_name, options, error, pattern, loaded, tmp_path):
    options = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(error, match=pattern):
        _pipe(loaded, cls_name)(CELLS.copy(), progress=False, **options)
    assert not any(tmp_path.iterdir())  # no file started


def test_matrix_input_needs_matching_gene_names(loaded):
    pipe = _pipe(loaded, "CellFeatureExtractionPipeline")
    x = CELLS.raw.X[:2].toarray()
    with pytest.raises(ValueError, match="gene_names"):
        pipe(x, progress=False)
    with pytest.raises(ValueError, match="765 columns but 10 gene names"):
        pipe(x, gene_names=list(CELLS.raw.var_names[:10]), progress=False)


def test_write_to_adata_needs_an_in_memory_anndata(loaded, cells):
    pipe = _pipe(loaded, "CellFeatureExtractionPipeline")
    with pytest.raises(ValueError, match="in-memory AnnData"):
        pipe(ad.read_h5ad(cells, backed="r"), write_to_adata=True, progress=False)


@pytest.mark.parametrize(
    "option, pattern",
    [
        (dict(n_bins=1), r"n_bins=1: binning needs at least 2 bins"),
        (dict(n_bins=-5), r"n_bins=-5"),
        (dict(max_genes=1), r"max_genes=1 leaves no room"),
        (dict(min_vocab_coverage=1.5), r"min_vocab_coverage=1.5"),
    ],
)
def test_bad_cell_processor_option(option, pattern, model_dir, loaded, tmp_path):
    """Out-of-range processor options are refused where they are set: in Python, and in a saved folder."""
    from modeling_scmmgpt import ScMMGPTCellProcessor, ScMMGPTProcessor

    _, processor = loaded
    with pytest.raises(ValueError, match=pattern):
        ScMMGPTCellProcessor(processor.feature_extractor.gene_vocab, **option)
    folder = str(tmp_path / "model")
    shutil.copytree(model_dir, folder)
    _edit_json(os.path.join(folder, "processor_config.json"), lambda c: c["feature_extractor"].update(option))
    with pytest.raises(ValueError, match=pattern):
        ScMMGPTProcessor.from_pretrained(folder)


def test_n_cells_below_one(loaded):
    with pytest.raises(ValueError, match="n_cells=0"):
        _pipe(loaded, "TextToCellPipeline")("a B cell", n_cells=0)


PIPELINE_WARNINGS = [
    # (name, call, warning pattern, check of the result)
    (
        "repeated labels are merged",
        lambda p: p["annotate"](
            CELLS.copy(), candidate_labels=["B cell", "B cell", "T cell"], top_k=3, progress=False
        ),
        r"repeat|merged",
        lambda r: all(len(x) == 2 for x in r),
    ),
    (
        "top_k beyond the labels is cut",
        lambda p: p["annotate"](CELLS.copy(), candidate_labels=["B cell", "T cell"], top_k=5, progress=False),
        r"top_k=5",
        lambda r: all(len(x) == 2 for x in r),
    ),
    (
        "CL ids in any case and separator",
        lambda p: p["annotate"](CELLS.copy(), candidate_labels=["cl_0000236", "CL:0000236"], progress=False),
        r"repeat|merged",
        lambda r: all(x[0]["label"] == "CL:0000236" for x in r),
    ),
    (
        "an empty description prompt",
        lambda p: p["describe"](CELLS.copy()[:2], prompt="", max_new_tokens=2, progress=False),
        r"prompt is empty",
        lambda r: len(r) == 2,
    ),
    (
        "an empty generation prompt",
        lambda p: p["generate"]("", max_text_tokens=0),
        r"prompt is empty",
        lambda r: r.n_obs == 1,
    ),
    (
        "a prompt longer than the LM's context",
        lambda p: p["generate"]("a B cell " * 2000, max_text_tokens=0),
        r"past the LM's context of 2048: its last \d+ tokens are cut",
        lambda r: r.n_obs == 1,
    ),
    (
        "a description prompt longer than the context",
        lambda p: p["describe"](CELLS.copy()[:1], prompt="describe " * 3000, max_new_tokens=2, progress=False),
        r"past the LM's context",
        lambda r: len(r) == 1,
    ),
]


@pytest.mark.parametrize("name, call, pattern, check", PIPELINE_WARNINGS, ids=[c[0] for c in PIPELINE_WARNINGS])
def test_pipeline_warns_and_handles(name, call, pattern, check, loaded):
    pipes = {
        "annotate": _pipe(loaded, "CellTypeAnnotationPipeline"),
        "describe": _pipe(loaded, "CellDescriptionPipeline"),
        "generate": _pipe(loaded, "TextToCellPipeline"),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call(pipes)
    assert any(re.search(pattern, str(w.message)) for w in caught), [str(w.message) for w in caught]
    assert check(result)


def test_a_bare_string_is_one_label(loaded):
    ranked = _pipe(loaded, "CellTypeAnnotationPipeline")(
        CELLS.copy(), candidate_labels="B cell", top_k=1, progress=False
    )
    assert [r[0]["label"] for r in ranked] == ["B cell"] * CELLS.n_obs  # not the characters 'B', ' ', 'c', ...


def test_prompt_with_no_room_left_is_refused(loaded):
    with pytest.raises(ValueError, match="no room for the prompt"):
        _pipe(loaded, "CellDescriptionPipeline")(CELLS.copy()[:1], max_new_tokens=5000, progress=False)


# --- 4. CLI calls ----------------------------------------------------------------------------------------------------
def test_output_is_the_input(model_dir, cells, capsys):
    _check_cli_case(
        ["annotate", "--model", model_dir, "--input", cells, "--output", cells, "--labels", "B cell"],
        r"is the --input file",
        capsys,
        inputs=[cells],
    )


@pytest.mark.parametrize("output, pattern", [("out.txt", r"unknown format"), ("missing/out.csv", r"does not exist")])
def test_bad_output_path(output, pattern, model_dir, cells, tmp_path, capsys):
    target = str(tmp_path / output)
    argv = ["describe", "--model", model_dir, "--input", cells, "--output", target]
    _check_cli_case(argv, pattern, capsys, inputs=[cells], outputs=[target])


# The reading commands' common start, with a model and an input (the "{...}" fields are filled per test).
_READ = ["--model", "{model}", "--input", "{cells}", "--output"]
_ANNOTATE_B = ["annotate", *_READ, "{tmp}/o.csv", "--labels", "B cell"]
CLI_ERRORS = [
    ("unknown command", ["frobnicate"], r"invalid choice"),
    ("missing required option", ["embed", "--model", "m"], r"required"),
    ("top-k 0", [*_ANNOTATE_B, "--top-k", "0"], r"top_k=0"),
    ("top-k negative", [*_ANNOTATE_B, "--top-k", "-1"], r"top_k=-1"),
    ("batch size 0", ["embed", *_READ, "{tmp}/o.h5ad", "--batch-size", "0"], r"batch_size=0"),
    ("coverage above 1", ["embed", *_READ, "{tmp}/o.h5ad", "--min-vocab-coverage", "1.5"], r"not a fraction"),
    (
        "n-cells 0",
        ["generate", "--model", "{model}", "--prompt", "a B cell", "--n-cells", "0", "--output", "{tmp}/o.h5ad"],
        r"n_cells=0|n-cells",
    ),
    ("max-new-tokens 0", ["describe", *_READ, "{tmp}/o.csv", "--max-new-tokens", "0"], r"max_new_tokens=0"),
    ("unknown CL id", ["annotate", *_READ, "{tmp}/o.csv", "--labels", "CL:9999999"], r"CL:9999999"),
    (
        "model path is a file",
        ["embed", "--model", "{cells}", "--input", "{cells}", "--output", "{tmp}/o.h5ad"],
        r"not a saved scMMGPT model folder",
    ),
    ("convert a missing scGPT folder", ["convert-scgpt", "{tmp}/no_scgpt", "{tmp}/out"], r"no such scGPT checkpoint"),
    (
        "init into a non-empty folder",
        ["init", "--cell-encoder", "{model}", "--language-model", "{model}", "--output-dir", "{model}"],
        r"exists and is not empty",
    ),
    (
        "push a missing model",
        ["push", "--model", "{tmp}/nothing", "--repo-id", "me/x"],
        r"not a saved scMMGPT model folder",
    ),
    (
        "evaluate without test cells",
        ["evaluate", "--model", "{model}", "--train-data", "{tmp}/none.h5ad", "--output-json", "{tmp}/m.json"],
        r"none\.h5ad",
    ),
]


@pytest.mark.parametrize("name, argv, pattern", CLI_ERRORS, ids=[c[0] for c in CLI_ERRORS])
def test_bad_cli_call(name, argv, pattern, model_dir, cells, tmp_path, capsys):
    argv = [a.format(model=model_dir, cells=cells, tmp=tmp_path) for a in argv]
    outputs = [a for a in argv if a.startswith(str(tmp_path)) and os.path.splitext(a)[1] in (".csv", ".h5ad", ".json")]
    _check_cli_case(argv, pattern, capsys, inputs=[cells], outputs=outputs)


def test_convert_refuses_a_pickle_that_runs_code(tmp_path, capsys):
    """A scGPT checkpoint whose pickle would call a function is refused by `torch.load(weights_only=True)`, in one
    line; the function never runs."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    folder = tmp_path / "scgpt"
    folder.mkdir()
    (folder / "best_model.pt").write_bytes(pickle.dumps(Payload()))
    (folder / "args.json").write_text(json.dumps({"embsize": 8, "nheads": 2, "d_hid": 8, "nlayers": 1}))
    (folder / "vocab.json").write_text(json.dumps({"A": 0, "<pad>": 1, "<cls>": 2, "<eoc>": 3}))
    _check_cli_case(
        ["convert-scgpt", str(folder), str(tmp_path / "out")],
        r"Weights only load failed|weights_only",
        capsys,
        inputs=[str(folder / "best_model.pt")],
        outputs=[str(tmp_path / "out")],
    )
    assert not (tmp_path / "pwned").exists()


def test_push_without_a_network_is_one_line(model_dir):
    """The Hub unreachable (an endpoint where nothing listens): one line and a hint, in a fresh process so that the
    endpoint is read at import, as a user's shell would set it."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_test", "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "scmmgpt.cli", "push", "--model", model_dir, "--repo-id", "me/scmmgpt-test"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    _one_line_error(result.returncode, result.stderr, r"[Cc]onnect|refused")
    assert "could not be reached" in result.stderr


def test_debug_keeps_the_traceback(model_dir, tmp_path, capsys):
    from scmmgpt.cli import CLIError

    with pytest.raises(CLIError, match="no such file"):
        main(
            [
                "--debug",
                "embed",
                "--model",
                model_dir,
                "--input",
                str(tmp_path / "nope.h5ad"),
                "--output",
                str(tmp_path / "o.h5ad"),
            ]
        )


# --- 5. training configs -------------------------------------------------------------------------------------------
# The bad configs are YAML, kept as YAML: tests/fixtures/bad_training_configs.yaml.
with open(os.path.join(os.path.dirname(__file__), "fixtures", "bad_training_configs.yaml"), encoding="utf-8") as f:
    CONFIG_CASES = [(name, case["config"], case["error"]) for name, case in yaml.safe_load(f).items()]


@pytest.mark.parametrize("name, text, pattern", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_training_config(name, text, pattern, tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(text.format(tmp=tmp_path))
    _check_cli_case(
        ["train", "--stage", "instruction", str(config)],
        pattern,
        capsys,
        inputs=[str(config)],
        outputs=[str(tmp_path / "run" / "model.safetensors")],
    )


def test_missing_config_file(tmp_path, capsys):
    _check_cli_case(["train", "--stage", "contrastive", str(tmp_path / "nope.yaml")], r"nope\.yaml", capsys)


def test_unknown_stage(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(f"output_dir: {tmp_path}/run\n")
    code, err = _cli(["train", "--stage", "pretraining", str(config)], capsys)
    assert code == 2 and "pretraining" in err and "Traceback" not in err


def test_bad_data_options_are_named_before_training(tmp_path, capsys, pbmc):
    """Data errors come before any model is built: an obs filter that selects nothing, one that does not parse, a
    missing label column, a label column with no labels, held-out types that are not in the data."""
    data = ad.AnnData(X=pbmc.raw.X.copy(), obs=pbmc.obs.copy(), var=pbmc.raw.var.copy())
    data.obs["empty"] = np.nan
    source = _write(data, tmp_path / "mine.h5ad")
    cases = [
        ("obs_filter: \"bulk_labels == 'nothing'\"\nlabel_column: bulk_labels\n", r"selects no cells|no cells"),
        ('obs_filter: "bulk_labels =="\nlabel_column: bulk_labels\n', r"obs_filter"),
        ("label_column: celltype\n", r"celltype"),
        ("label_column: empty\n", r"empty.*no labels|no labels"),
        ("label_column: bulk_labels\nholdout_cell_types: [Martian cell]\n", r"Martian cell"),
    ]
    for extra, pattern in cases:
        config = tmp_path / "cfg.yaml"
        config.write_text(
            f"output_dir: {tmp_path}/run\ntrain_data: [{source}]\ndemo_language_model: tiny\nmax_steps: 1\n" + extra
        )
        _check_cli_case(
            ["train", "--stage", "contrastive", str(config)],
            pattern,
            capsys,
            inputs=[source],
            outputs=[str(tmp_path / "run" / "model.safetensors")],
        )


def test_crashed_stage_resumes_or_refuses_and_says_which(tmp_path, caplog):
    """A folder with checkpoints of an unfinished run: the default resumes from the last one and says so; asked not
    to resume, the run refuses; overwrite_output_dir deletes them and starts over, and says so."""
    from trainers.run import _resume_point, parse_stage

    out = tmp_path / "run"
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoint-10").mkdir()
    for name in ("checkpoint-5", "checkpoint-10"):
        (out / name / "trainer_state.json").write_text("{}")
    parse = lambda *extra: parse_stage("contrastive", ["--output_dir", str(out), "--use_cpu", "true", *extra])[1]  # noqa: E731
    with caplog.at_level("WARNING"):
        assert _resume_point("contrastive", parse()).endswith("checkpoint-10")
    assert "resuming the contrastive stage from" in caplog.text
    with pytest.raises(
        ValueError,
        match=r"holds 2 checkpoint\(s\) of an unfinished run \(the last: checkpoint-10\).*overwrite_output_dir",
    ):
        _resume_point("contrastive", parse("--resume_from_checkpoint", "false"))
    assert (out / "checkpoint-10").exists()  # refused: nothing deleted
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert _resume_point("contrastive", parse("--overwrite_output_dir", "true")) == ""
    assert "deleting 2 checkpoint(s)" in caplog.text and not (out / "checkpoint-10").exists()
    assert _resume_point("contrastive", parse()) == ""  # nothing to resume: starts from step 0


# --- 6. disk faults --------------------------------------------------------------------------------------------------
def _limited_run(argv, max_bytes):
    """`scmmgpt argv` in a process that may write files of at most `max_bytes`: a full disk, as the writer sees it
    (EFBIG), where a tmpfs cannot be mounted."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return subprocess.run(
        [sys.executable, "-m", "scmmgpt.cli", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        preexec_fn=limit,
        timeout=300,
    )


@pytest.mark.parametrize("command, output", [("embed", "out.h5ad"), ("embed", "in_place"), ("describe", "out.csv")])
def test_full_disk_is_refused_before_any_compute(command, output, model_dir, cells, tmp_path):
    before = _digest(cells)
    target = cells if output == "in_place" else str(tmp_path / output)
    argv = [command, "--model", model_dir, "--input", cells, "--output", target]
    argv += ["--overwrite"] if output == "in_place" else []
    argv += ["--max-new-tokens", "2"] if command == "describe" else []
    result = _limited_run(argv, max_bytes=2048)
    _one_line_error(result.returncode, result.stderr, r"MiB needed, 0 MiB allowed by the file-size limit")
    assert _digest(cells) == before
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["cells.h5ad"], leftovers  # no output, no temporary file


def test_full_disk_while_streaming_embeddings(model_dir, tmp_path):
    """A stream to .npy that fails part-way leaves neither the file nor its `.partial`."""
    code = (
        "import sys, resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTProcessor\n"
        "from modeling_scmmgpt.pipelines import CellFeatureExtractionPipeline\n"
        "m = sys.argv[1]\n"
        "pipe = CellFeatureExtractionPipeline(model=ScMMGPTForConditionalGeneration.from_pretrained(m), "
        "processor=ScMMGPTProcessor.from_pretrained(m), task=None)\n"
        "try:\n    pipe(sys.argv[2], output_file=sys.argv[3], batch_size=4, progress=False)\n"
        "except OSError as e:\n    print('OSError', e.errno)\n"
    )
    cells = _write(pbmc_cells()[:40].copy(), tmp_path / "cells.h5ad")
    target = str(tmp_path / "emb.npy")
    result = subprocess.run(
        [sys.executable, "-c", code, model_dir, cells, target],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert "OSError 27" in result.stdout or "OSError 28" in result.stdout, result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad"]


@pytest.mark.parametrize("delay", [0.5, 2.0, 4.0])
def test_kill_9_never_corrupts_the_input(delay, model_dir, cells, tmp_path):
    """Annotations written back into the input file with --overwrite, and the process killed (SIGKILL) at some
    point: the input is either untouched or the complete result, never a broken file; nothing else is at its path."""
    before = _digest(cells)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scmmgpt.cli",
            "annotate",
            "--model",
            model_dir,
            "--input",
            cells,
            "--output",
            cells,
            "--overwrite",
            "--labels",
            "B cell",
            "T cell",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if _digest(cells) != before:  # the run finished first: the result must be whole
        assert "scmmgpt_cell_type" in ad.read_h5ad(cells).obs
    else:
        ad.read_h5ad(cells)  # still a readable file
    visible = [p.name for p in tmp_path.iterdir() if not p.name.startswith(".tmp-")]
    assert visible == ["cells.h5ad"]
