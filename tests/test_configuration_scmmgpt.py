import pytest
from transformers import AutoConfig, Blip2QFormerConfig, GPT2Config, LlamaConfig, Qwen2Config

from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTConfig


TINY_CELL = dict(vocab_size=100, d_model=32, nhead=4, nlayers=2, d_hid=48, pad_token_id=97, cls_token_id=98)


def test_cell_config_defaults_are_scgpt_whole_human():
    config = ScMMGPTCellConfig()
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        60697,
        512,
        12,
        8,
    )
    assert (config.intermediate_size, config.n_bins, config.pad_value, config.max_genes) == (512, 51, -2.0, 1200)


def test_cell_config_accepts_scgpt_names():
    config = ScMMGPTCellConfig(**TINY_CELL)
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers, config.intermediate_size) == (
        32,
        4,
        2,
        48,
    )
    assert config.d_model == 32 and config.d_hid == 48


@pytest.mark.parametrize(
    "bad, message", [(dict(nhead=5), "multiple of num_attention_heads"), (dict(pad_token_id=100), "pad_token_id")]
)
def test_cell_config_rejects_bad_sizes(bad, message):
    with pytest.raises(Exception, match=message):
        ScMMGPTCellConfig(**{**TINY_CELL, **bad})


@pytest.mark.parametrize(
    "text_config, cls",
    [
        ({"model_type": "llama"}, LlamaConfig),
        ({"model_type": "qwen2"}, Qwen2Config),
        ({"model_type": "gpt2"}, GPT2Config),
        (None, LlamaConfig),
    ],
)
def test_sub_configs_and_roundtrip(text_config, cls, tmp_path):
    config = ScMMGPTConfig(cell_config=TINY_CELL, text_config=text_config, num_cell_tokens=8, cell_token_index=40)
    assert isinstance(config.cell_config, ScMMGPTCellConfig)
    assert isinstance(config.qformer_config, Blip2QFormerConfig)
    assert isinstance(config.text_config, cls)
    assert config.qformer_config.encoder_hidden_size == 32
    assert config.qformer_config.use_qformer_text_input
    assert config.cell_token_ids == list(range(40, 48))
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ScMMGPTConfig) and isinstance(loaded.text_config, cls)

    def strip(d):
        return {k: v for k, v in d.items() if k != "_name_or_path"}

    assert strip(loaded.to_dict()) == strip(config.to_dict())


def test_missing_cell_tokens_error_names_the_fix():
    with pytest.raises(ValueError, match="from_pretrained_parts"):
        ScMMGPTConfig(cell_config=TINY_CELL).cell_token_ids
