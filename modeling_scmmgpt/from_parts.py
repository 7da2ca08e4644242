"""Assemble a full scMMGPT from parts users already have: a cell-encoder folder, a causal LM folder (safetensors
or GGUF) and optionally a BERT folder that initialises the Q-Former, as BLIP-2 does."""

from __future__ import annotations

import copy
import logging
import os

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Blip2QFormerConfig

from .configuration_scmmgpt import ScMMGPTConfig
from .modeling_cell_encoder import ScMMGPTCellModel
from .processing_scmmgpt import ScMMGPTCellProcessor, ScMMGPTProcessor


logger = logging.getLogger(__name__)


# The BERT config fields a Q-Former takes over as they are.
_BERT_FIELDS = (
    "vocab_size hidden_size num_hidden_layers num_attention_heads intermediate_size hidden_act max_position_embeddings "
    "layer_norm_eps pad_token_id"
).split()


def qformer_config_from_bert(bert_dir: str | os.PathLike, cross_attention_frequency: int = 2) -> Blip2QFormerConfig:
    """A Q-Former with the BERT's sizes (BLIP-2 initialises its Q-Former from BERT-base)."""
    bert = AutoConfig.from_pretrained(bert_dir)
    sizes = {name: getattr(bert, name) for name in _BERT_FIELDS}
    return Blip2QFormerConfig(
        **sizes, cross_attention_frequency=cross_attention_frequency, use_qformer_text_input=True
    )


def bert_to_qformer_state_dict(bert_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Maps BERT weights onto `ScMMGPTCellTower` keys (`qformer.*`, `text_embeddings.*`).

    Each layer's feed-forward initialises both the text (`intermediate`/`output`) and the query
    (`intermediate_query`/`output_query`) branches, as in BLIP-2. Blip2's text embeddings have no token types, so
    BERT's type-0 embedding (added to every token of a single-segment input) is folded into the word embeddings:
    the text path then computes exactly what BERT computes. Cross-attention stays freshly initialised.

    Returns the mapped state dict and the BERT keys that have no counterpart (e.g. the pooler).
    """
    state = {k.removeprefix("bert."): v for k, v in bert_state.items()}
    mapped, unused = {}, []
    token_type = state.get("embeddings.token_type_embeddings.weight")
    for key, tensor in state.items():
        if key == "embeddings.word_embeddings.weight":
            mapped["text_embeddings.word_embeddings.weight"] = tensor + (
                token_type[0] if token_type is not None else 0
            )
        elif key == "embeddings.position_embeddings.weight":
            mapped["text_embeddings.position_embeddings.weight"] = tensor
        elif key.startswith("embeddings.LayerNorm."):
            mapped["qformer.layernorm." + key.rsplit(".", 1)[1]] = tensor
        elif key.startswith("encoder.layer."):
            name = key.replace(".attention.self.", ".attention.attention.")
            mapped["qformer." + name] = tensor
            for branch in (".intermediate.", ".output."):
                if branch in name and ".attention." not in name:
                    mapped["qformer." + name.replace(branch, branch[:-1] + "_query.")] = tensor
        elif key not in ("embeddings.token_type_embeddings.weight", "embeddings.position_ids"):
            unused.append(key)
    return mapped, unused


def _load_bert_state(bert_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = os.path.join(bert_dir, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: the Q-Former is initialised from a BERT folder with safetensors weights."
        )
    return load_file(path)


def build_from_parts(
    model_class,
    language_model: str | os.PathLike,
    cell_encoder: str | os.PathLike,
    qformer: str | os.PathLike | None = None,
    gguf_file: str | None = None,
    num_cell_tokens: int = 32,
    qformer_config: Blip2QFormerConfig | dict | None = None,
    cell_processor_kwargs: dict | None = None,
    **config_kwargs,
):
    """See [`ScMMGPTForConditionalGeneration.from_pretrained_parts`]."""
    # Language model and its tokenizer (GGUF files are de-quantised by transformers)
    lm_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(language_model, **lm_kwargs)
    lm = AutoModelForCausalLM.from_pretrained(language_model, dtype=torch.float32, **lm_kwargs)

    # Cell encoder and its vocabulary
    cell_model = ScMMGPTCellModel.from_pretrained(cell_encoder, dtype=torch.float32)
    cell_processor = ScMMGPTCellProcessor.from_pretrained(cell_encoder, **(cell_processor_kwargs or {}))
    cell_processor.check_cell_config(cell_model.config)
    if cell_model.config.gene_vocab_fingerprint is None:  # an encoder saved before fingerprints: it pairs from here on
        cell_model.config.gene_vocab_fingerprint = cell_processor.gene_vocab.fingerprint

    # Q-Former: sized like the BERT when one is given
    if qformer is not None:
        qformer_config = qformer_config_from_bert(qformer)
        qformer_tokenizer = AutoTokenizer.from_pretrained(qformer)
    else:
        # A random Q-Former reads text with the LM's tokenizer (the processor keeps a copy as its qformer_tokenizer):
        # its word embeddings get one row per LM token.
        qformer_tokenizer = None
    processor = ScMMGPTProcessor(
        cell_processor, tokenizer, num_cell_tokens=num_cell_tokens, qformer_tokenizer=qformer_tokenizer
    )
    if qformer is None:  # sized after the processor added the cell tokens to the shared tokenizer
        if isinstance(qformer_config, Blip2QFormerConfig):
            qformer_config = qformer_config.to_dict()
        qformer_config = {
            **(qformer_config or {}),
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
        }
    text_config = lm.config
    if getattr(text_config, "quantization_config", None) is not None:
        # GGUF weights are de-quantised to fp32 on load; a saved quantization_config would make later loads treat
        # the LM as quantized (and Trainer refuse to fine-tune it).
        text_config = copy.deepcopy(text_config)
        del text_config.quantization_config
    config = ScMMGPTConfig(
        cell_config=cell_model.config,
        qformer_config=qformer_config,
        text_config=text_config,
        **processor.config_token_ids(),
        **config_kwargs,
    )
    model = model_class(config)

    # Weights
    model.model.cell_tower.cell_model.load_state_dict(cell_model.state_dict())
    model.model.language_model.load_state_dict(lm.base_model.state_dict())
    model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    if qformer is not None:
        mapped, unused = bert_to_qformer_state_dict(_load_bert_state(qformer))
        result = model.model.cell_tower.load_state_dict(mapped, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"BERT weights that do not fit the Q-Former: {result.unexpected_keys[:5]}")
        logger.info("Q-Former initialised from %s; unused BERT keys: %s", qformer, unused)
    # New special tokens: grow the embeddings (and a tied lm_head) to the tokenizer. Never shrink them: LMs such as
    # Qwen2 pad their embedding table beyond the tokenizer (151936 rows for 151665 tokens), and their ids past the
    # tokenizer are real rows of the checkpoint. New rows start at the mean embedding (transformers' default).
    vocab_size = max(len(tokenizer), lm.get_input_embeddings().weight.shape[0])
    model.resize_token_embeddings(vocab_size)
    model.config.text_config.vocab_size = vocab_size
    # The LM's own decoding defaults (eos ids, sampling settings) carry over to generate().
    if lm.generation_config is not None:
        model.generation_config = lm.generation_config
    return model, processor
