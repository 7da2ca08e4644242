"""scGPT's own `TransformerModel`, imported from the installed `scgpt` package without running its `__init__`
(which needs torchtext, whose binary no longer loads on current torch). `scgpt/model/model.py` itself needs only
torch, numpy and tqdm."""

import pytest
import torch


def load_scgpt_model_module():
    """scGPT's own `scgpt/model/model.py` (with `TransformerModel`), for the side-by-side tests and
    `benchmarks/encode_cells.py` (test code, so not in the library). Raises `ImportError` when `scgpt` is not installed (`pip install --no-deps scgpt`)."""
    import importlib
    import importlib.util
    import os
    import sys
    import types

    spec = importlib.util.find_spec("scgpt")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("scgpt is not installed: pip install --no-deps scgpt")
    if "_scgpt_model" not in sys.modules:
        package = types.ModuleType("_scgpt_model")
        package.__path__ = [os.path.join(list(spec.submodule_search_locations)[0], "model")]
        sys.modules["_scgpt_model"] = package
    return importlib.import_module("_scgpt_model.model")


def scgpt_model_module():
    """[`load_scgpt_model_module`], or a skip where scGPT's module does not import."""
    try:
        return load_scgpt_model_module()
    except Exception as err:  # not installed, or a future scgpt release that imports more
        pytest.skip(
            f"scGPT's model module does not import here ({type(err).__name__}: {err}); the fixture comparisons still run"
        )


def scgpt_transformer(vocab, d_model, nhead, nlayers, d_hid, pad_value=-2, module=None, **options):
    """scGPT's `TransformerModel` as scGPT's own scripts build it (dropout 0.2, `<pad>` padding), sized by the
    arguments; `options` are its further keywords (`do_mvc`, `input_emb_style`, ...). `module` defaults to
    [`scgpt_model_module`] (a skip where scGPT does not import)."""
    module = module or scgpt_model_module()
    sizes = dict(d_model=d_model, nhead=nhead, d_hid=d_hid, nlayers=nlayers)
    common = dict(vocab=vocab, dropout=0.2, pad_token="<pad>", pad_value=pad_value)
    return module.TransformerModel(ntoken=len(vocab), **sizes, **common, **options)


def random_scgpt(d_model, nhead, nlayers, d_hid, vocab, seed, input_emb_style="continuous", n_bins=51, pad_value=-2):
    """A scGPT TransformerModel with every parameter randomised (biases and LayerNorms too), in eval mode."""
    torch.manual_seed(seed)
    n_input_bins = n_bins + 2 if input_emb_style == "category" else None
    style = dict(input_emb_style=input_emb_style, n_input_bins=n_input_bins, do_mvc=True)
    model = scgpt_transformer(vocab, d_model, nhead, nlayers, d_hid, pad_value, **style)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(
                torch.randn_like(param) * 0.3 + (1.0 if param.dim() == 1 and param.shape[0] == d_model else 0.0)
            )
    return model.eval()


def flash_layout(state: dict) -> dict:
    """The released checkpoints' layout: flash-attn `Wqkv` names for the packed projection."""
    return {
        k.replace("self_attn.in_proj_weight", "self_attn.Wqkv.weight").replace(
            "self_attn.in_proj_bias", "self_attn.Wqkv.bias"
        ): v
        for k, v in state.items()
    }
