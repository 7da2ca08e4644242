"""The cell encoder against scGPT 0.2.4's own outputs (tests/fixtures/scgpt_oracle, made by shared/scgpt_oracle)."""

import pytest
import torch
from tester import tiny_cell_config

from modeling_scmmgpt import GeneVocab, ScMMGPTCellConfig, ScMMGPTCellModel, ScMMGPTCellProcessor
from modeling_scmmgpt.convert_scgpt import convert_scgpt_state_dict
from modeling_scmmgpt.processing_scmmgpt import cell_inputs


def _model(oracle, layout="state", attn="sdpa"):
    meta = oracle["io"]["meta"]
    args = meta["model_ctor"]
    config = ScMMGPTCellConfig(
        vocab_size=args["ntoken"],
        d_model=args["d_model"],
        nhead=args["nhead"],
        nlayers=args["nlayers"],
        d_hid=args["d_hid"],
        dropout=args["dropout"],
        pad_token_id=meta["pad_id"],
        cls_token_id=meta["cls_id"],
    )
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
        emb = _model(oracle)(**cell_inputs(inputs)).pooler_output
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
    config = tiny_cell_config(value_embedding="binned", n_bins=5)
    model = ScMMGPTCellModel(config).eval()
    genes = torch.tensor([[config.cls_token_id, 3, 4, config.pad_token_id]])
    values = torch.tensor([[-2.0, 1.0, 4.0, -2.0]])
    with torch.no_grad():
        out = model(genes, values).last_hidden_state
        shifted = model(genes, torch.tensor([[-2.0, 2.0, 4.0, -2.0]])).last_hidden_state
    assert not torch.allclose(out[0, 1], shifted[0, 1])
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with torch.no_grad():
        assert torch.equal(ScMMGPTCellModel.from_pretrained(tmp_path).eval()(genes, values).last_hidden_state, out)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_padding_matches_masked_batch_and_each_cell_alone(checkpointing):
    """Padded batches go through the layers packed (no compute on padding). Outputs and gradients equal the masked
    padded batch and each cell run alone, and are zero at padding."""
    torch.manual_seed(0)
    config = tiny_cell_config(nlayers=2, d_hid=24, dropout=0.0)
    model = ScMMGPTCellModel(config).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    lengths = [5, 2, 4]
    genes = torch.full((3, 5), config.pad_token_id)
    values = torch.zeros(3, 5)
    for row, n in enumerate(lengths):
        genes[row, :n] = torch.cat([torch.tensor([config.cls_token_id]), torch.randint(0, 28, (n - 1,))])
        values[row, :n] = torch.rand(n) * 5

    def run(gene_ids, vals, pack=True):
        model.zero_grad()
        model.config.pack_padded_cells = pack
        out = model(gene_ids, vals, output_hidden_states=True)
        out.pooler_output.pow(2).sum().backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    packed, packed_grads = run(genes, values)
    masked, masked_grads = run(genes, values, pack=False)
    keep = genes.ne(config.pad_token_id)
    assert torch.equal(packed.last_hidden_state[~keep], torch.zeros_like(packed.last_hidden_state[~keep]))
    assert len(packed.hidden_states) == len(masked.hidden_states) == config.num_hidden_layers + 1
    for ours, reference in zip(packed.hidden_states, masked.hidden_states):
        assert ours.shape == reference.shape == (*genes.shape, config.hidden_size)  # packed layers recorded padded
        torch.testing.assert_close(ours[keep], reference[keep], atol=1e-5, rtol=1e-5)
    # transformers' output capturing: hidden states selected by index, packed or not; the others are None.
    for pack in (True, False):
        model.config.pack_padded_cells = pack
        selected = model(genes, values, output_hidden_states=[0, -2]).hidden_states
        assert [h is not None for h in selected] == [True, True, False]
        torch.testing.assert_close(selected[1][keep], masked.hidden_states[1][keep], atol=1e-5, rtol=1e-5)
    assert packed_grads.keys() == masked_grads.keys()
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], masked_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    alone = [
        run(genes[row : row + 1, :n], values[row : row + 1, :n])[0].pooler_output for row, n in enumerate(lengths)
    ]
    torch.testing.assert_close(packed.pooler_output, torch.cat(alone), atol=1e-5, rtol=1e-5)


def _two_cells():
    """A full cell and a padded one (pad 28, `<cls>` 29) for the packing tests."""
    genes = torch.tensor([[29, 3, 4, 5], [29, 6, 28, 28]])
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 4.0, -2.0, -2.0]])
    return genes, values


def test_packed_encoder_without_layers_returns_its_embeddings():
    """A zero-layer encoder (the embeddings alone) packed: the embeddings, zero at padding, with hidden states or
    without."""
    config = tiny_cell_config(nlayers=0, pack_padded_cells=True)
    model = ScMMGPTCellModel(config).eval()
    genes, values = _two_cells()
    with torch.no_grad():
        embeddings = model.gene_encoder(genes) + model.value_encoder(values)
        for recorded in (False, True):
            out = model(genes, values, output_hidden_states=recorded)
            torch.testing.assert_close(out.last_hidden_state, embeddings * genes.ne(28)[..., None])


def test_packing_is_automatic_on_gpus_only():
    """`pack_padded_cells=None` keeps CPU batches padded (unless the fast mode measured packing faster, see
    test_fast_mode.py); `True` packs anywhere, which shows as zeros at padding."""
    config = tiny_cell_config()
    model = ScMMGPTCellModel(config).eval()
    genes, values = _two_cells()
    with torch.no_grad():
        auto = model(genes, values).last_hidden_state
        model.config.pack_padded_cells = True
        packed = model(genes, values).last_hidden_state
    assert auto[1, 2:].abs().sum() > 0 and packed[1, 2:].abs().sum() == 0
    torch.testing.assert_close(auto[genes != 28], packed[genes != 28], atol=1e-5, rtol=1e-5)


def test_transformers_output_and_checkpointing_conventions():
    """`return_dict=False` gives a tuple, `config.output_hidden_states` is the default, and
    `activation_checkpointing_enable()` checkpoints each layer (transformers' `GradientCheckpointingLayer`: the layer's
    inside runs again in the backward pass)."""
    torch.manual_seed(0)
    config = tiny_cell_config(nlayers=2, d_hid=24, dropout=0.0)
    model = ScMMGPTCellModel(config).train()
    genes = torch.cat([torch.full((2, 1), config.cls_token_id), torch.randint(0, 28, (2, 4))], 1)
    values = torch.rand(2, 5)
    as_tuple = model(genes, values, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], model(genes, values).last_hidden_state)
    assert model(genes, values).hidden_states is None
    model.config.output_hidden_states = True
    assert len(model(genes, values).hidden_states) == config.num_hidden_layers + 1
    model.config.output_hidden_states = False

    calls = []
    model.layers[0].self_attn.register_forward_hook(lambda *unused: calls.append(1))
    for checkpointing, expected in ((False, 1), (True, 2)):
        if checkpointing:
            model.activation_checkpointing_enable()
        calls.clear()
        model(genes, values).pooler_output.sum().backward()
        assert len(calls) == expected, checkpointing
