"""scGPT checkpoints to our encoder, checked against scGPT's own implementation on fresh random weights."""

import json

import pytest
import torch
from scgpt_reference import flash_layout, random_scgpt

from modeling_scmmgpt import GeneVocab, ScMMGPTCellModel, ScMMGPTCellProcessor
from modeling_scmmgpt.convert_scgpt import convert_scgpt_checkpoint


def _write_checkpoint(directory, model, args, vocab, layout):
    state = model.state_dict() if layout == "in_proj" else flash_layout(model.state_dict())
    torch.save(state, directory / "best_model.pt")
    (directory / "args.json").write_text(json.dumps(args))
    (directory / "vocab.json").write_text(json.dumps(vocab))


@pytest.mark.parametrize("layout", ["in_proj", "Wqkv"])
@pytest.mark.parametrize(
    "sizes, seed, style",
    [((32, 4, 2, 48), 1, "continuous"), ((48, 3, 3, 32), 7, "continuous"), ((32, 2, 2, 32), 3, "category")],
)
def test_converted_checkpoint_matches_scgpt(tmp_path, pbmc, layout, sizes, seed, style):
    d_model, nhead, nlayers, d_hid = sizes
    genes = list(pbmc.raw.var_names)
    vocab = {g: i for i, g in enumerate(genes)}
    vocab.update({"<pad>": len(genes), "<cls>": len(genes) + 1, "<eoc>": len(genes) + 2})
    n_bins = 51
    pad_value = n_bins if style == "category" else -2
    scgpt = random_scgpt(d_model, nhead, nlayers, d_hid, vocab, seed, style, n_bins, pad_value)
    args = {
        "embsize": d_model,
        "nheads": nhead,
        "nlayers": nlayers,
        "d_hid": d_hid,
        "dropout": 0.2,
        "n_bins": n_bins,
        "pad_value": pad_value,
        "pad_token": "<pad>",
        "input_emb_style": style,
        "max_seq_len": 1200,
    }
    _write_checkpoint(tmp_path, scgpt, args, vocab, layout)
    out = tmp_path / "converted"
    ours, processor, report = convert_scgpt_checkpoint(str(tmp_path), output_dir=str(out))
    assert report.missing == [] and all(k.startswith(("decoder", "mvc_decoder", "cls_decoder")) for k in report.unused)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    reloaded = ScMMGPTCellModel.from_pretrained(out).eval()
    processor = ScMMGPTCellProcessor.from_pretrained(out, use_raw=True)
    inputs = processor(pbmc[:6])
    gene_ids, values, mask = inputs["cell_gene_ids"], inputs["cell_values"], inputs["cell_attention_mask"]
    with torch.no_grad():  # scGPT in eval mode takes torch's fast path, as its embed_data does
        reference = scgpt._encode(gene_ids, values, src_key_padding_mask=gene_ids.eq(vocab["<pad>"]))
    with torch.no_grad():
        mine = reloaded(gene_ids, values, mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(mine[keep], reference[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(mine[:, 0], reference[:, 0], atol=1e-5, rtol=0)


def test_missing_files_and_missing_weights_are_named(tmp_path, pbmc):
    with pytest.raises(FileNotFoundError, match="best_model.pt"):
        convert_scgpt_checkpoint(str(tmp_path))
    vocab = {g: i for i, g in enumerate(pbmc.raw.var_names[:50])}
    vocab.update({"<pad>": 50, "<cls>": 51, "<eoc>": 52})
    scgpt = random_scgpt(16, 2, 1, 16, vocab, 0)
    args = {"embsize": 16, "nheads": 2, "nlayers": 1, "d_hid": 16, "pad_token": "<pad>"}
    state = {k: v for k, v in scgpt.state_dict().items() if "norm2" not in k}
    torch.save(state, tmp_path / "best_model.pt")
    (tmp_path / "args.json").write_text(json.dumps(args))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="missing from the checkpoint.*norm2"):
        convert_scgpt_checkpoint(str(tmp_path))


def test_census_vocab_special_tokens_follow_the_checkpoint_layout():
    from modeling_scmmgpt.resources import census_vocab_path

    vocab = GeneVocab.from_scgpt_json(census_vocab_path())
    assert (vocab.pad_token_id, vocab.cls_token_id) == (60694, 60695)


def test_convert_example_script(tmp_path, pbmc, capsys):
    import runpy
    import sys

    vocab = {g: i for i, g in enumerate(pbmc.raw.var_names)}
    vocab.update({"<pad>": len(vocab), "<cls>": len(vocab) + 1, "<eoc>": len(vocab) + 2})
    scgpt = random_scgpt(16, 2, 1, 16, vocab, 0)
    args = {"embsize": 16, "nheads": 2, "nlayers": 1, "d_hid": 16, "pad_token": "<pad>", "n_bins": 51}
    _write_checkpoint(tmp_path, scgpt, args, vocab, "Wqkv")
    argv, sys.argv = sys.argv, ["convert_scgpt.py", str(tmp_path / "best_model.pt"), str(tmp_path / "out")]
    try:
        runpy.run_path("examples/convert_scgpt.py", run_name="__main__")
    finally:
        sys.argv = argv
    assert "gene tokens" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_random_initialisation_follows_scgpt(pbmc):
    """A new encoder is initialised as scGPT's own model is (torch's defaults, MultiheadAttention's xavier in-projection,
    gene embeddings uniform in +-0.1), not BERT-style std 0.02, under which attention barely moves a new encoder's
    residual stream and every cell embeds almost alike."""
    from scgpt_reference import scgpt_transformer

    from modeling_scmmgpt.convert_scgpt import convert_scgpt_state_dict

    genes = list(pbmc.raw.var_names)
    vocab = {g: i for i, g in enumerate(genes)} | {
        "<pad>": len(genes),
        "<cls>": len(genes) + 1,
        "<eoc>": len(genes) + 2,
    }
    sizes = dict(d_model=64, nhead=4, nlayers=2, d_hid=128)
    torch.manual_seed(0)
    theirs = scgpt_transformer(vocab, **sizes)
    token_ids = dict(pad_token_id=vocab["<pad>"], cls_token_id=vocab["<cls>"])
    config = ScMMGPTCellModel.config_class(vocab_size=len(vocab), **sizes, **token_ids)
    ours = ScMMGPTCellModel(config).state_dict()
    reference, _ = convert_scgpt_state_dict(theirs.state_dict(), list(ours))
    assert reference.keys() == ours.keys()
    for name, value in ours.items():
        expected = reference[name]
        if expected.std() == 0:  # LayerNorms, zero biases
            assert torch.equal(value, expected), name
        else:
            assert value.abs().max() <= expected.abs().max() * 1.05, name
            torch.testing.assert_close(value.std(), expected.std(), rtol=0.25, atol=0, msg=name)
