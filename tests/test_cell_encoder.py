"""The cell encoder against scGPT 0.2.4's own outputs (tests/fixtures/scgpt_oracle, made by shared/scgpt_oracle)."""

import pytest
import torch

from modeling_scmmgpt import GeneVocab, ScMMGPTCellConfig, ScMMGPTCellModel, ScMMGPTCellProcessor
from modeling_scmmgpt.convert_scgpt import convert_scgpt_state_dict


def _model(oracle, layout="state", attn="sdpa"):
    meta = oracle["io"]["meta"]
    args = meta["model_ctor"]
    config = ScMMGPTCellConfig(
        vocab_size=args["ntoken"], d_model=args["d_model"], nhead=args["nhead"], nlayers=args["nlayers"],
        d_hid=args["d_hid"], dropout=args["dropout"], pad_token_id=meta["pad_id"], cls_token_id=meta["cls_id"],
    )  # fmt: skip
    model = ScMMGPTCellModel(config).eval()
    model.set_attn_implementation(attn)
    state, report = convert_scgpt_state_dict(oracle[layout], list(model.state_dict()))
    assert report.missing == []
    assert all(k.split(".")[0] in ("decoder", "cls_decoder", "mvc_decoder", "flag_encoder") for k in report.unused)
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("layout", ["state", "state_flashkeys"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["caseA_embed_data_path", "caseC_preprocessor_tokenize_path"])
def test_matches_scgpt_transformer_output(oracle, layout, attn, case):
    model = _model(oracle, layout, attn)
    data = oracle["io"][case]
    with torch.no_grad():
        out = model(data["gene"], data["expr"], output_hidden_states=True)
    keep = ~data["src_key_padding_mask"]
    ref = data["outputs"]
    torch.testing.assert_close(out.hidden_states[0][keep], ref["total_embs"][keep], atol=1e-5, rtol=0)
    for ours, theirs in zip(out.hidden_states[1:], ref["layer_outputs"]):
        torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.last_hidden_state[keep], ref["transformer_output"][keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooler_output, ref["cell_emb"], atol=1e-5, rtol=0)


def test_processor_plus_encoder_reproduce_scgpt_cell_embeddings(oracle):
    """Case B: scGPT's get_batch_cell_embeddings end to end, from raw values to normalised cell embeddings."""
    io = oracle["io"]
    case = io["caseB_get_batch_cell_embeddings"]
    vocab = GeneVocab(io["meta"]["vocab_stoi"])
    genes = [vocab.id_to_gene[int(i)] for i in case["gene_ids_of_columns"]]
    inputs = ScMMGPTCellProcessor(vocab)(case["X"].numpy(), gene_names=genes)
    with torch.no_grad():
        emb = _model(oracle)(inputs["gene_ids"], inputs["values"], inputs["attention_mask"]).pooler_output
    torch.testing.assert_close(emb / emb.norm(dim=-1, keepdim=True), case["cell_embeddings"], atol=1e-5, rtol=0)


def test_padding_does_not_change_a_cell(oracle):
    model = _model(oracle)
    data = oracle["io"]["caseA_embed_data_path"]
    n = int((~data["src_key_padding_mask"][0]).sum())
    with torch.no_grad():
        alone = model(data["gene"][:1, :n], data["expr"][:1, :n]).pooler_output
        padded = model(data["gene"], data["expr"]).pooler_output[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=0)


def test_binned_value_embedding_and_save_load(tmp_path):
    config = ScMMGPTCellConfig(vocab_size=20, d_model=16, nhead=2, nlayers=1, d_hid=16, pad_token_id=18,
                               cls_token_id=19, value_embedding="binned", n_bins=5)  # fmt: skip
    model = ScMMGPTCellModel(config).eval()
    genes = torch.tensor([[19, 3, 4, 18]])
    values = torch.tensor([[-2.0, 1.0, 4.0, -2.0]])
    with torch.no_grad():
        out = model(genes, values).last_hidden_state
        shifted = model(genes, torch.tensor([[-2.0, 2.0, 4.0, -2.0]])).last_hidden_state
    assert not torch.allclose(out[0, 1], shifted[0, 1])
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with torch.no_grad():
        assert torch.equal(ScMMGPTCellModel.from_pretrained(tmp_path).eval()(genes, values).last_hidden_state, out)
