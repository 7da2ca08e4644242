"""Builder examples (dicts with `gene_ids`, `values`, `description`, `cell_type`, `cell_id`) to stage inputs.

collator = ScMMGPTContrastiveCollator(processor, max_text_length=128)
batch = collator([dataset[i] for i in range(8)])   # what Trainer's DataLoader does
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import stable_hash


CELL_KEYS = ("gene_ids", "values")  # the builder records' columns (sparse, per cell), not model tensors


def _check(examples: list[dict], keys: tuple[str, ...], who: str):
    if not examples:
        raise ValueError(f"{who} got an empty batch.")
    missing = [k for k in keys if k not in examples[0]]
    if missing:
        raise KeyError(
            f"{who}: examples lack {missing} (have {sorted(examples[0])}). Pass builder examples and keep "
            "remove_unused_columns=False."
        )


def _cells(processor, examples: list[dict]) -> dict:
    """The cell processor's `cell_*` tensors (`cell_expression` included) for builder examples."""
    return dict(
        processor.feature_extractor([{k: ex[k] for k in (*CELL_KEYS, "cell_id") if k in ex} for ex in examples])
    )


@dataclass
class ScMMGPTContrastiveCollator:
    """Stage 1 inputs.

    Returns a dict with `cell_gene_ids`, `cell_values`, `cell_attention_mask` (`(batch, genes)`), `text_input_ids`,
    `text_attention_mask` (`(batch, tokens)`, from `processor.qformer_tokenizer`), `text_hash` (`(batch,)` int64, a
    hash of the *tokenised* text, so texts the model cannot tell apart count as the same), `cell_type_hash`
    (`(batch,)`, when `label_field` is set) and `cell_ids` (list of str, for logging).
    """

    processor: object
    max_text_length: int = 128
    text_field: str = "description"
    label_field: str | None = "cell_type"

    def __post_init__(self):
        if getattr(self.processor, "qformer_tokenizer", None) is None:
            raise ValueError("The processor has no qformer_tokenizer: the Q-Former text path needs one.")

    def __call__(self, examples: list[dict]) -> dict:
        keys = (*CELL_KEYS, self.text_field) + ((self.label_field,) if self.label_field else ())
        _check(examples, keys, type(self).__name__)
        texts = [ex[self.text_field] for ex in examples]
        if any(not isinstance(t, str) or not t for t in texts):
            raise ValueError(f"Every example needs a non-empty {self.text_field!r} string.")
        # Right padding whatever the tokenizer's default: the text path reads position 0 as [CLS] and numbers
        # positions from the left, so left padding would make a text's features depend on its batch.
        tokens = self.processor.qformer_tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
            padding_side="right",
        )
        text_hash = [
            stable_hash(ids[mask.bool()].tolist()) for ids, mask in zip(tokens["input_ids"], tokens["attention_mask"])
        ]
        batch = _cells(self.processor, examples)
        batch.pop("cell_expression")
        batch["text_input_ids"] = tokens["input_ids"]
        batch["text_attention_mask"] = tokens["attention_mask"]
        batch["text_hash"] = torch.tensor(text_hash, dtype=torch.long)
        if self.label_field:
            batch["cell_type_hash"] = torch.tensor([stable_hash(str(ex[self.label_field])) for ex in examples])
        batch["cell_ids"] = [str(ex.get("cell_id", "")) for ex in examples]
        return batch


@dataclass
class ScMMGPTReconstructionCollator:
    """Stage 2 inputs: `cell_gene_ids`, `cell_values`, `cell_expression` (pre-binning values, the expression target),
    `cell_attention_mask` (each `(batch, genes)`) and `cell_ids`. Masking happens in the trainer, seeded per step."""

    processor: object

    def __call__(self, examples: list[dict]) -> dict:
        _check(examples, CELL_KEYS, type(self).__name__)
        batch = _cells(self.processor, examples)
        batch["cell_ids"] = [str(ex.get("cell_id", "")) for ex in examples]
        return batch
