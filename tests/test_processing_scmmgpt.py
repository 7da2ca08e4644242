import json
import logging
import os

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file
from transformers import AutoFeatureExtractor, AutoProcessor, FeatureExtractionMixin

from modeling_scmmgpt import GeneVocab, ScMMGPTCellProcessor, ScMMGPTConfig, ScMMGPTProcessor
from modeling_scmmgpt.processing_scmmgpt import CELL_INPUT_NAMES, bin_values
from modeling_scmmgpt.resources import gencode_human_path


def _cells_equal(a, b):
    for key in ("cell_gene_ids", "cell_values", "cell_expression", "cell_attention_mask"):
        assert torch.equal(a[key], b[key]), key


def test_outputs_shapes_cls_and_padding(pbmc, pbmc_cell_processor):
    out = pbmc_cell_processor(pbmc[:4])
    assert out["cell_gene_ids"].dtype == torch.int64 and out["cell_values"].dtype == torch.float32
    assert out["cell_gene_ids"].shape == out["cell_values"].shape == out["cell_attention_mask"].shape
    assert out["cell_gene_ids"].shape[1] <= pbmc_cell_processor.max_genes
    assert (out["cell_gene_ids"][:, 0] == pbmc_cell_processor.gene_vocab.cls_token_id).all()
    assert (out["cell_values"][:, 0] == -2).all()
    pad = out["cell_attention_mask"] == 0
    assert (out["cell_gene_ids"][pad] == pbmc_cell_processor.gene_vocab.pad_token_id).all()
    assert (out["cell_values"][pad] == -2).all()
    real = out["cell_values"][:, 1:][out["cell_attention_mask"][:, 1:] == 1]
    assert real.min() >= 1 and real.max() <= 50  # nonzero genes land in bins 1..n_bins-1


def test_sparse_dense_and_anndata_inputs_agree(pbmc, pbmc_cell_processor):
    genes = list(pbmc.raw.var_names)
    dense = pbmc.raw.X[:6].toarray()
    from_adata = pbmc_cell_processor(pbmc[:6])
    from_sparse = pbmc_cell_processor(sp.csr_matrix(dense), gene_names=genes)
    from_dense = pbmc_cell_processor(dense, gene_names=genes)
    _cells_equal(from_adata, from_sparse)
    _cells_equal(from_adata, from_dense)


def test_batch_composition_does_not_change_a_cell(pbmc, pbmc_cell_processor):
    alone = pbmc_cell_processor(pbmc[10:11], padding="max_length")
    mixed = pbmc_cell_processor(pbmc[[3, 10, 500]], padding="max_length")
    for key in CELL_INPUT_NAMES:
        assert torch.equal(alone[key][0], mixed[key][1]), key


def test_top_expressed_genes_are_kept(pbmc, pbmc_vocab):
    small = ScMMGPTCellProcessor(pbmc_vocab, max_genes=11, use_raw=True, binning=False)
    full = ScMMGPTCellProcessor(pbmc_vocab, max_genes=2000, use_raw=True, binning=False)
    cut, whole = small(pbmc[:1]), full(pbmc[:1])
    kept = cut["cell_expression"][0, 1:][cut["cell_attention_mask"][0, 1:] == 1]
    everything = whole["cell_expression"][0, 1:][whole["cell_attention_mask"][0, 1:] == 1]
    assert len(kept) == 10
    assert torch.equal(kept.sort(descending=True).values, everything.sort(descending=True).values[:10])


def test_ensembl_ids_match_symbols(pbmc, census_vocab):
    vocab = GeneVocab(census_vocab.gene_to_id)
    assert vocab.add_ensembl_ids_from_gencode(gencode_human_path()) > 30000
    symbol_to_ensembl = {s: e for e, s in vocab.ensembl_to_symbol.items()}
    adata = pbmc.raw.to_adata()
    adata = adata[:, [g in symbol_to_ensembl for g in adata.var_names]].copy()
    assert adata.n_vars > 650
    # Versioned IDs, as CELLxGENE and 10x write them.
    adata.var["feature_id"] = [symbol_to_ensembl[g] + ".5" for g in adata.var_names]
    by_symbol = ScMMGPTCellProcessor(vocab, max_genes=100)(adata[:5])
    by_ensembl = ScMMGPTCellProcessor(vocab, max_genes=100, gene_id_column="feature_id")(adata[:5])
    _cells_equal(by_symbol, by_ensembl)


def test_ensembl_ids_without_aliases_fail_with_a_hint(pbmc, census_vocab):
    adata = pbmc.raw.to_adata()
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    with pytest.raises(ValueError, match=r"100% of genes in adata.X are not in the vocabulary.*Ensembl"):
        ScMMGPTCellProcessor(census_vocab)(adata[:2])


def test_unknown_and_duplicated_genes_are_counted(pbmc, census_vocab, caplog):
    adata = pbmc.raw.to_adata()[:3].copy()
    names = list(adata.var_names)
    names[0], names[1] = "NOT_A_GENE_1", "NOT_A_GENE_2"
    names[3] = names[2]  # duplicated column
    adata.var_names = names
    processor = ScMMGPTCellProcessor(census_vocab)
    with caplog.at_level(logging.WARNING):
        processor(adata)
    cov = processor.last_coverage
    assert {"NOT_A_GENE_1", "NOT_A_GENE_2"} <= set(cov.unknown)
    assert cov.duplicated == [names[2]]
    assert cov.n_known == adata.n_vars - len(cov.unknown) - 1
    assert "unknown" in caplog.text and "already used" in caplog.text


def test_coverage_threshold_is_configurable(pbmc, pbmc_vocab):
    adata = pbmc.raw.to_adata()[:2]  # 765 genes, 705 of them known to the model's 705
    strict = ScMMGPTCellProcessor(pbmc_vocab, min_vocab_coverage=0.99)
    strict(adata)  # the model has fewer genes than the input: it decides on the model's genes measured, 100%
    known = [g for g in adata.var_names if g in pbmc_vocab]
    x = np.ones((2, 1000), dtype=np.float32)
    # More genes than the model has, but only 300 of its 705: the model's genes decide.
    wide = known[:300] + [f"NOT_A_GENE_{i}" for i in range(700)]
    with pytest.raises(ValueError, match="measures 300 of the model's 705 genes"):
        ScMMGPTCellProcessor(pbmc_vocab, min_vocab_coverage=0.5)(x, gene_names=wide)
    ScMMGPTCellProcessor(pbmc_vocab, min_vocab_coverage=0.4)(x, gene_names=wide)
    # Fewer genes than the model has: the input's own genes decide.
    narrow = known[:40] + [f"NOT_A_GENE_{i}" for i in range(60)]
    with pytest.raises(ValueError, match="60% of genes in .* are not in the vocabulary"):
        ScMMGPTCellProcessor(pbmc_vocab, min_vocab_coverage=0.5)(x[:, :100], gene_names=narrow)


@pytest.mark.parametrize(
    "corrupt, message",
    [(lambda x: x.__setitem__((0, 3), np.nan), "NaN"), (lambda x: x.__setitem__((1, 3), -1.0), "negative")],
)
def test_bad_values_raise_clear_errors(pbmc, pbmc_vocab, corrupt, message):
    x = pbmc.raw.X[:2].toarray()
    corrupt(x)
    with pytest.raises(ValueError, match=message):
        ScMMGPTCellProcessor(pbmc_vocab)(x, gene_names=list(pbmc.raw.var_names))


def test_scaled_x_is_refused_with_a_hint(pbmc, pbmc_vocab):
    # pbmc.X is scaled (negative values); the processor must point at .raw or a counts layer.
    with pytest.raises(ValueError, match="use_raw=True"):
        ScMMGPTCellProcessor(pbmc_vocab, min_vocab_coverage=0.0)(pbmc[:2])


def test_missing_gene_id_column_and_layer(pbmc, pbmc_vocab):
    with pytest.raises(KeyError, match="gene_id_column='feature_id'"):
        ScMMGPTCellProcessor(pbmc_vocab, gene_id_column="feature_id")(pbmc[:2])
    with pytest.raises(KeyError, match="counts"):
        ScMMGPTCellProcessor(pbmc_vocab, layer="counts")(pbmc[:2])


def test_binning_matches_scgpt_where_deterministic(oracle):
    """scGPT breaks ties between equal bin edges at random; ours takes the middle of that same range."""
    for name, case in oracle["io"]["caseD_binning_units"]["cases"].items():
        row = case["row"].numpy()
        ours = bin_values(row, 51)
        nonzero = row > 0
        edges = np.quantile(row[nonzero], np.linspace(0, 1, 50))
        left = np.digitize(row[nonzero], edges)
        right = np.digitize(row[nonzero], edges, right=True)
        low = np.minimum(right + 1, left)
        assert ((ours[nonzero] >= low) & (ours[nonzero] <= left)).all(), name
        assert ((case["binned"].numpy()[nonzero] >= low) & (case["binned"].numpy()[nonzero] <= left)).all()
        assert (ours[~nonzero] == 0).all()
        if name == "distinct_floats":
            assert ours.tolist() == case["binned"].tolist()


def test_scgpt_preprocessor_path_gives_the_same_tokens(oracle):
    """Case C: normalize_total 1e4, log1p, binning, zero genes included, <cls> value 0."""
    io = oracle["io"]
    case = io["caseC_preprocessor_tokenize_path"]
    vocab = GeneVocab(io["meta"]["vocab_stoi"])
    processor = ScMMGPTCellProcessor(
        vocab, normalize_total=1e4, log1p=True, include_zero_genes=True, cls_value=0, max_genes=98
    )
    genes = [vocab.id_to_gene[i] for i in range(97)]
    out = processor(case["raw_counts"].numpy(), gene_names=genes)
    assert torch.equal(out["cell_gene_ids"], case["gene"])
    torch.testing.assert_close(out["cell_expression"][:, 1:], case["X_log1p"], atol=1e-5, rtol=0)
    assert out["cell_values"][:, 0].eq(0).all()


def test_cell_processor_save_load(pbmc, pbmc_cell_processor, tmp_path):
    """A transformers feature extractor: the library's save writes its options and the vocabulary in one config, and
    both `from_pretrained` and `AutoFeatureExtractor` read them back, with keyword overrides of the options."""
    assert isinstance(pbmc_cell_processor, FeatureExtractionMixin)
    pbmc_cell_processor.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["preprocessor_config.json"]
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["feature_extractor_type"] == "ScMMGPTCellProcessor" and saved["max_genes"] == 64
    assert saved["gene_vocab"] == pbmc_cell_processor.gene_vocab.to_dict()
    assert GeneVocab.from_pretrained(tmp_path) == pbmc_cell_processor.gene_vocab
    assert "CD3E" not in repr(pbmc_cell_processor)  # the vocabulary only as a summary
    for reloaded in (ScMMGPTCellProcessor.from_pretrained(tmp_path), AutoFeatureExtractor.from_pretrained(tmp_path)):
        assert type(reloaded) is ScMMGPTCellProcessor
        assert reloaded.gene_vocab == pbmc_cell_processor.gene_vocab
        assert reloaded.to_dict() == pbmc_cell_processor.to_dict()
        _cells_equal(reloaded(pbmc[:3]), pbmc_cell_processor(pbmc[:3]))
    assert ScMMGPTCellProcessor.from_pretrained(tmp_path, max_genes=16)(pbmc[:3])["cell_gene_ids"].shape[1] == 16
    with pytest.raises(ValueError, match=r"unknown option 'max_gene' \(did you mean 'max_genes'\?\)"):
        ScMMGPTCellProcessor.from_pretrained(tmp_path, max_gene=16)
    # The loaders' own keywords (pipeline() passes dtype to every part) are not options and are left alone.
    assert ScMMGPTCellProcessor.from_pretrained(tmp_path, dtype="float32").to_dict() == pbmc_cell_processor.to_dict()


def test_cell_processor_folders_with_the_vocabulary_beside_the_config_still_load(pbmc, pbmc_cell_processor, tmp_path):
    """Folders saved before the vocabulary moved into the config keep it in `gene_vocab.json`: `from_pretrained`
    reads it; `AutoFeatureExtractor`, which builds from the config alone, says how to load and re-save it."""
    pbmc_cell_processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    config.pop("gene_vocab")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    pbmc_cell_processor.gene_vocab.save_pretrained(tmp_path)
    reloaded = ScMMGPTCellProcessor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == pbmc_cell_processor.to_dict()
    _cells_equal(reloaded(pbmc[:3]), pbmc_cell_processor(pbmc[:3]))
    with pytest.raises(ValueError, match=r"no gene vocabulary.*gene_vocab\.json.*save it again"):
        AutoFeatureExtractor.from_pretrained(tmp_path)


def test_processor_expands_placeholders_and_builds_prompts(pbmc, pbmc_cell_processor, tokenizer):
    processor = ScMMGPTProcessor(pbmc_cell_processor, tokenizer, num_cell_tokens=3)
    span = "<cell><cell_0><cell_1><cell_2></cell>"
    assert processor.expand_cell_placeholders("a <cell> and <cell> b") == f"a {span} and {span} b"
    assert processor.expand_cell_placeholders(f"x {span}") == f"x {span}"
    prompt = processor.build_prompt("Describe this cell.")
    assert prompt.startswith("<|user|> <cell>") and prompt.endswith("<|assistant|>")
    inputs = processor(text=[prompt, "<cell> <cell> two cells"], cells=pbmc[:3])
    ids = inputs["input_ids"]
    for token_id in [processor.cell_start_token_id, processor.cell_token_id + 2, processor.cell_end_token_id]:
        assert int((ids == token_id).sum()) == 3
    assert inputs["cell_gene_ids"].shape[0] == 3 and "cell_expression" not in inputs
    tok_ids = tokenizer.convert_tokens_to_ids(["<cell_0>", "<cell_1>", "<cell_2>"])
    assert tok_ids == [processor.cell_token_id + i for i in range(3)]


def test_processor_without_chat_template_uses_plain_prompt(pbmc_cell_processor, tokenizer):
    tokenizer.chat_template = None
    processor = ScMMGPTProcessor(pbmc_cell_processor, tokenizer, num_cell_tokens=2)
    assert processor.build_prompt("Which cell type is this?") == "User: <cell>\nWhich cell type is this?\nAssistant:"


def _separate_qformer_tokenizer():
    from conftest import make_tokenizer

    qformer = make_tokenizer()
    qformer.add_tokens(["qformer-only"])  # so that a mix-up with the LM tokenizer shows
    return qformer


def test_processor_roundtrip_with_autoprocessor(pbmc, pbmc_cell_processor, tokenizer, tmp_path):
    """The library's save/load: the cell processor in the `feature_extractor` entry of `processor_config.json`,
    the Q-Former's own tokenizer in `qformer_tokenizer/`, and `AutoProcessor` gives back the same tensors."""
    qformer = _separate_qformer_tokenizer()
    processor = ScMMGPTProcessor(pbmc_cell_processor, tokenizer, qformer, num_cell_tokens=3)
    ScMMGPTConfig(
        cell_config=dict(vocab_size=len(pbmc_cell_processor.gene_vocab), pad_token_id=0, cls_token_id=1),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer)),
        **processor.config_token_ids(),
    ).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "ScMMGPTProcessor" and saved["num_cell_tokens"] == 3
    assert saved["feature_extractor"]["feature_extractor_type"] == "ScMMGPTCellProcessor"
    assert saved["feature_extractor"]["gene_vocab"] == pbmc_cell_processor.gene_vocab.to_dict()
    assert (
        not (tmp_path / "gene_vocab.json").exists() and (tmp_path / "qformer_tokenizer" / "tokenizer.json").is_file()
    )
    assert "CD3E" not in repr(processor)  # the vocabulary only as a summary
    assert GeneVocab.from_pretrained(tmp_path) == pbmc_cell_processor.gene_vocab  # a model folder is a vocabulary
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, ScMMGPTProcessor)
    assert reloaded.config_token_ids() == processor.config_token_ids()
    assert reloaded.chat_template == processor.chat_template
    assert reloaded.feature_extractor.to_dict() == pbmc_cell_processor.to_dict()
    assert reloaded.qformer_tokenizer("qformer-only")["input_ids"] == qformer("qformer-only")["input_ids"]
    assert "qformer-only" not in reloaded.tokenizer.get_vocab()
    assert type(AutoFeatureExtractor.from_pretrained(tmp_path)) is ScMMGPTCellProcessor
    a = processor(text=processor.build_prompt("Describe."), cells=pbmc[:1])
    b = reloaded(text=reloaded.build_prompt("Describe."), cells=pbmc[:1])
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert AutoProcessor.from_pretrained(tmp_path, max_genes=16).feature_extractor.max_genes == 16
    # A folder saved before the vocabulary moved into the config (gene_vocab.json beside it) still loads.
    saved["feature_extractor"].pop("gene_vocab")
    (tmp_path / "processor_config.json").write_text(json.dumps(saved))
    pbmc_cell_processor.gene_vocab.save_pretrained(tmp_path)
    assert AutoProcessor.from_pretrained(tmp_path).feature_extractor.to_dict() == pbmc_cell_processor.to_dict()


def test_processor_without_qformer_tokenizer_reads_text_with_the_lm_tokenizer(
    pbmc_cell_processor, tokenizer, tmp_path
):
    processor = ScMMGPTProcessor(pbmc_cell_processor, tokenizer, num_cell_tokens=2)
    assert processor.qformer_tokenizer.get_vocab() == tokenizer.get_vocab()  # the cell tokens included
    processor.save_pretrained(tmp_path)
    reloaded = ScMMGPTProcessor.from_pretrained(tmp_path)
    assert reloaded.qformer_tokenizer.get_vocab() == reloaded.tokenizer.get_vocab() == tokenizer.get_vocab()


LEGACY_FOLDER = os.path.join(os.path.dirname(__file__), "fixtures", "processor_v0_1")


def test_folders_saved_before_the_feature_extractor_still_load(pbmc, tmp_path):
    """A folder written by scMMGPT 0.1's own code (`cell_processor_config.json`, a processor config without a
    `feature_extractor` entry) loads, gives the tensors that code gave, and re-saves in the library's layout."""
    expected = load_file(os.path.join(LEGACY_FOLDER, "expected.safetensors"))
    folder = os.path.join(LEGACY_FOLDER, "processor")
    assert "cell_processor_config.json" in os.listdir(folder)
    for loader in (ScMMGPTProcessor.from_pretrained, AutoProcessor.from_pretrained):
        processor = loader(folder)
        assert isinstance(processor, ScMMGPTProcessor) and processor.feature_extractor.n_bins == 11
        text = [processor.build_prompt("Describe this cell.", response="cell type: B cell.")] * 3
        inputs = processor(text=text, cells=pbmc[:3])
        assert sorted(inputs) == sorted(k for k in expected if k != "qformer_input_ids")
        for key in inputs:
            assert torch.equal(inputs[key], expected[key]), key
        qformer_ids = processor.qformer_tokenizer(["qformer-only B cell"], return_tensors="pt")["input_ids"]
        assert torch.equal(qformer_ids, expected["qformer_input_ids"])
    assert ScMMGPTCellProcessor.from_pretrained(folder).to_dict() == processor.feature_extractor.to_dict()
    processor.save_pretrained(tmp_path)
    assert "cell_processor_config.json" not in os.listdir(tmp_path)
    assert "feature_extractor" in json.loads((tmp_path / "processor_config.json").read_text())
    again = ScMMGPTProcessor.from_pretrained(tmp_path)(text=text, cells=pbmc[:3])
    for key in inputs:
        assert torch.equal(again[key], inputs[key]), key


def test_backed_anndata_gives_the_same_tensors(pbmc, pbmc_cell_processor, tmp_path):
    import anndata as ad

    path = tmp_path / "pbmc.h5ad"
    adata = pbmc.raw.to_adata()
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    processor = ScMMGPTCellProcessor(pbmc_cell_processor.gene_vocab, max_genes=64)
    _cells_equal(processor(backed[100:110]), pbmc_cell_processor(pbmc[100:110]))
    backed.file.close()


def test_sparse_examples_give_the_same_tensors_as_the_matrix(pbmc, pbmc_cell_processor):
    """The data builders yield vocabulary ids and nonzero values; processing them equals processing the matrix."""
    vocab = pbmc_cell_processor.gene_vocab
    ids, _ = vocab.map_genes(list(pbmc.raw.var_names))
    dense = pbmc.raw.X[:5].toarray()
    examples = [{"gene_ids": ids[(ids >= 0) & (row > 0)], "values": row[(ids >= 0) & (row > 0)]} for row in dense]
    _cells_equal(pbmc_cell_processor(examples), pbmc_cell_processor(pbmc[:5]))
    batch = {"gene_ids": [e["gene_ids"] for e in examples], "values": [e["values"] for e in examples]}
    _cells_equal(pbmc_cell_processor(batch), pbmc_cell_processor(pbmc[:5]))
    import pyarrow as pa

    table = pa.table(
        {"gene_ids": [e["gene_ids"].tolist() for e in examples], "values": [e["values"].tolist() for e in examples]}
    )
    _cells_equal(pbmc_cell_processor(table.slice(1, 3)), pbmc_cell_processor(pbmc[1:4]))
    bad = [{"gene_ids": [1, 2], "values": [1.0, float("nan")], "cell_id": "AAAC-1"}]
    with pytest.raises(ValueError, match=r"example 0 \(AAAC-1\) has NaN"):
        pbmc_cell_processor(bad)


def test_fast_quantiles_are_bit_identical_to_numpy():
    """Each cell's bin edges, computed for many cells at once, equal numpy's quantiles of that cell alone."""
    from modeling_scmmgpt.processing_scmmgpt import _linear_quantiles_ragged

    rng = np.random.default_rng(0)
    for _ in range(50):
        cells = [
            np.sort(np.round(rng.gamma(1.0, 2.0, int(n)), int(rng.integers(0, 4))) + 0.001)
            for n in rng.integers(1, 1500, size=int(rng.integers(1, 12)))
        ]
        q = np.linspace(0, 1, int(rng.integers(2, 60)))
        counts = np.array([len(c) for c in cells])
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        got = _linear_quantiles_ragged(np.concatenate(cells), starts, counts, q)
        for row, x in zip(got, cells):
            expected = np.quantile(x, q)
            assert row.dtype == expected.dtype and np.array_equal(row, expected)


def test_cells_binned_together_get_the_bins_each_gets_alone():
    """Binning a batch at once (flat arrays, one searchsorted for all cells) is the per-cell binning, cell by cell:
    no value is binned against another cell's edges, with ties, empty and all-zero cells, and extreme values."""
    from modeling_scmmgpt.processing_scmmgpt import bin_ragged

    rng = np.random.default_rng(1)
    cells = [
        np.round(rng.gamma(0.5, 3.0, int(n)) * (rng.random(int(n)) < 0.6), int(rng.integers(0, 3)))
        for n in rng.integers(0, 300, size=300)
    ]
    cells += [np.array([]), np.zeros(4), np.array([7.0]), np.full(5, 2.0), np.array([1e-300, 1e300, 0.0, 3.0])]
    cells += [np.zeros(3), np.array([])]  # empty cells last: their edges would start past the end
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in cells])])
    together = bin_ragged(np.concatenate(cells), offsets, 51)
    for i, cell in enumerate(cells):
        alone = bin_values(cell, 51)
        assert np.array_equal(together[offsets[i] : offsets[i + 1]], alone), i
        assert alone.min(initial=0) >= 0 and alone.max(initial=0) <= 50 and (alone[cell == 0] == 0).all()


def test_examples_with_unequal_genes_and_values_are_refused(pbmc_cell_processor):
    bad = [{"gene_ids": [1, 2], "values": [1.0, 2.0]}, {"gene_ids": [1, 2, 3], "values": [1.0], "cell_id": "X-1"}]
    with pytest.raises(ValueError, match=r"example 1 \(X-1\) has 3 gene_ids but 1 values"):
        pbmc_cell_processor(bad)


def test_processor_reads_and_writes_cells_from_examples(pbmc, pbmc_cell_processor, tokenizer):
    """Builder examples count as cells, and a span the LM writes takes a target cell, not an input cell."""
    processor = ScMMGPTProcessor(pbmc_cell_processor, tokenizer, num_cell_tokens=3)
    ids, _ = pbmc_cell_processor.gene_vocab.map_genes(list(pbmc.raw.var_names))
    dense = pbmc.raw.X[:3].toarray()
    examples = [{"gene_ids": ids[(ids >= 0) & (row > 0)], "values": row[(ids >= 0) & (row > 0)]} for row in dense]
    texts = [
        processor.build_prompt("Describe this cell.", response="a cell"),
        processor.build_prompt("Generate a B cell.", with_cell=False, response="<cell>"),
    ]
    inputs = processor(text=texts, cells=examples[:1], target_cells=examples[1:2])
    assert inputs["cell_gene_ids"].shape[0] == 1 and inputs["target_cell_gene_ids"].shape[0] == 1
    expected = pbmc_cell_processor(pbmc[1:2])
    torch.testing.assert_close(inputs["target_cell_expression"], expected["cell_expression"])
    with pytest.raises(ValueError, match="2 '<cell>' placeholders but 2 cells to read and 1 to write"):
        processor(text=texts, cells=examples[:2], target_cells=examples[2:])


def test_gene_mapping_follows_vocabulary_changes(pbmc, census_vocab):
    """The per-genes mapping cache must not outlive a vocabulary change (e.g. Ensembl ids added later)."""
    symbol_vocab = GeneVocab(census_vocab.gene_to_id)
    adata = pbmc.raw.to_adata()[:3]
    ensembl = GeneVocab(census_vocab.gene_to_id)
    ensembl.add_ensembl_ids_from_gencode(gencode_human_path())
    symbol_to_ensembl = {s: e for e, s in ensembl.ensembl_to_symbol.items()}
    adata = adata[:, [g in symbol_to_ensembl for g in adata.var_names]].copy()
    adata.var["feature_id"] = [symbol_to_ensembl[g] for g in adata.var_names]
    processor = ScMMGPTCellProcessor(symbol_vocab, max_genes=50, gene_id_column="feature_id", min_vocab_coverage=0)
    assert processor(adata)["cell_gene_ids"].shape == (3, 1)  # <cls> only: no Ensembl id is known yet
    symbol_vocab.add_ensembl_ids_from_gencode(gencode_human_path())
    assert processor(adata)["cell_gene_ids"].shape == (3, 50)


def test_normalising_already_normalised_data_warns(pbmc, pbmc_vocab, caplog):
    ScMMGPTCellProcessor(pbmc_vocab, use_raw=True)(pbmc[:2])
    assert "expect raw counts" not in caplog.text
    ScMMGPTCellProcessor(pbmc_vocab, use_raw=True, normalize_total=1e4, log1p=True)(pbmc[:2])
    assert "look already normalised" in caplog.text
