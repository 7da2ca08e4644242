"""A small tester in the shape of transformers' model testers: tiny configs plus inputs built from real PBMC cells."""

import torch

from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTConfig, ScMMGPTProcessor


# The Q-Former and the decoders share one tiny size; Llama and Qwen2 take it with grouped-query attention,
# GPT-2 names its own.
_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TINY_DECODER = dict(**_TINY, num_key_value_heads=2, max_position_embeddings=256)
TINY_QFORMER = dict(**_TINY, vocab_size=64, max_position_embeddings=64)
TEXT_CONFIGS = {
    "llama": dict(model_type="llama", **TINY_DECODER),
    "qwen2": dict(model_type="qwen2", **TINY_DECODER),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=256, tie_word_embeddings=True),
}
# A cell encoder over a 30-token vocabulary (28 genes, then <pad> and <cls>), for tests of the encoder alone.
_TINY_CELL = dict(vocab_size=30, pad_token_id=28, cls_token_id=29, d_model=16, nhead=2, nlayers=1, d_hid=16)


def tiny_cell_config(vocab=None, **overrides) -> ScMMGPTCellConfig:
    """A tiny `ScMMGPTCellConfig`: over `vocab` (a `GeneVocab`) when given, else over 30 tokens; `overrides` win."""
    return ScMMGPTCellConfig(**{**_TINY_CELL, **(vocab.cell_config_fields() if vocab else {}), **overrides})


class ScMMGPTModelTester:
    """Builds a tiny scMMGPT and a processor over `cell_processor`'s real gene vocabulary."""

    def __init__(self, cell_processor, tokenizer, text_model_type="llama", num_cell_tokens=4, **config_overrides):
        self.processor = ScMMGPTProcessor(cell_processor, tokenizer, num_cell_tokens=num_cell_tokens)
        self.text_model_type = text_model_type
        self.num_cell_tokens = num_cell_tokens
        self.config_overrides = config_overrides

    def get_config(self) -> ScMMGPTConfig:
        vocab = self.processor.feature_extractor.gene_vocab
        text_config = dict(TEXT_CONFIGS[self.text_model_type], vocab_size=len(self.processor.tokenizer))
        tokenizer = self.processor.tokenizer
        if self.text_model_type == "gpt2":
            text_config.update(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        else:
            text_config.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return ScMMGPTConfig(
            cell_config=tiny_cell_config(vocab, d_model=32, nhead=4, nlayers=2, d_hid=32, dropout=0.0, max_genes=64),
            qformer_config=dict(**TINY_QFORMER, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            text_config=text_config,
            projection_dim=16,
            **self.processor.config_token_ids(),
            **self.config_overrides,
        )

    def describe_inputs(self, cells):
        """Cell-to-text inputs: one prompt per cell, the description labelled."""
        processor = self.processor
        texts = [
            processor.build_prompt("Describe this cell.", response="cell type: B cell.") for _ in range(cells.n_obs)
        ]
        inputs = processor(text=texts, cells=cells)
        prompt_len = len(processor.tokenizer(processor.build_prompt("Describe this cell."))["input_ids"])
        prompt_len += self.num_cell_tokens + 1  # the <cell> placeholder grew into a span
        labels = inputs["input_ids"].clone()
        labels[inputs["attention_mask"] == 0] = -100
        for row in range(labels.shape[0]):
            first = int(inputs["attention_mask"][row].argmax())  # left padding
            labels[row, : first + prompt_len] = -100
        return inputs, labels

    def generate_inputs(self, cells):
        """Text-to-cell inputs: a prompt and the cell span the LM must write, plus the target cells."""
        processor = self.processor
        texts = [
            processor.build_prompt("Generate a cell of type monocyte.", with_cell=False, response=processor.cell_span)
            for _ in range(cells.n_obs)
        ]
        inputs = processor(text=texts)
        labels = inputs["input_ids"].clone()
        span_start = inputs["input_ids"] == processor.cell_start_token_id
        # Label from <cell> on: the LM must choose to write a cell and the span is its output.
        labels[span_start.long().cumsum(-1) == 0] = -100
        targets = processor.feature_extractor(cells)
        inputs.update({f"target_{k}": v for k, v in targets.items()})
        return inputs, labels


def grad_norms(model: torch.nn.Module, prefix: str) -> list[float]:
    return [
        float(p.grad.abs().sum()) if p.grad is not None else 0.0
        for n, p in model.named_parameters()
        if n.startswith(prefix)
    ]
