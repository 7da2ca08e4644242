"""Stage 3, instruction tuning: interleaved cell/text instructions for the three tasks on TRL's `SFTTrainer`.

Describe and annotate examples read a cell (`<cell>` in the prompt); generate examples write one (the response is
the cell span), and for those the model adds its cell-regression and expression losses to the LM loss. The LM loss
counts response tokens only. LoRA on the LM through `peft`; the cell encoder can be frozen, LoRA-adapted or trained,
the Q-Former frozen or trained; the projector, the LM-to-cell head and the expression decoder always train.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from trl import SFTConfig, SFTTrainer

from .common import AtomicCheckpointsMixin, mean_over_ranks
from .data.instructions import instruction_examples

TASKS = ("describe", "annotate", "generate")
LOSS_PARTS = ("lm_loss", "cell_regression_loss", "expression_loss")  # of the model's output, logged
ATTENTION_PROJECTIONS = "(q_proj|k_proj|v_proj|o_proj)"
# Always trained in full (and saved with the adapters): the parts that connect the cell and text spaces.
BRIDGE_MODULES = ["multi_modal_projector", "cell_head", "expression_decoder"]


@dataclass
class ScMMGPTInstructionArguments(SFTConfig):
    r"""
    [`SFTConfig`] plus the instruction stage's choices.

    Args:
        tasks (`list[str]`, defaults to all three): which of `describe`, `annotate`, `generate` to train on; each cell
            gives one example per task.
        instruction_seed (`int`, defaults to 0): picks the phrasing of each instruction (per cell, the same on every
            run and rank).
        use_lora (`bool`, defaults to `True`): LoRA adapters on the LM's attention projections (the LM stays frozen).
        lora_r, lora_alpha, lora_dropout: LoRA hyper-parameters.
        cell_encoder_mode (`str`, defaults to `"frozen"`): `"frozen"`, `"lora"` (adapters on its attention
            projections) or `"full"`.
        qformer_mode (`str`, defaults to `"frozen"`): the Q-Former `"frozen"`, `"lora"` (adapters on its attention
            query/key/value) or `"full"` (with its queries).
    """

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    instruction_seed: int = 0
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    cell_encoder_mode: str = "frozen"
    qformer_mode: str = "frozen"
    # Our collator turns builder examples into model inputs; TRL must not tokenise or drop their columns.
    remove_unused_columns: bool = False
    dataset_kwargs: dict | None = field(default_factory=lambda: {"skip_prepare_dataset": True})
    report_to: str | list[str] = "none"
    # TRL turns activation checkpointing on to save memory; on small LoRA runs it only costs a second forward.
    # Turn it on for 7B-class LMs.
    activation_checkpointing: bool | None = False
    gradient_checkpointing: bool = False
    # None: bf16 where it is fast (a bf16-capable GPU, or a CPU with native bf16), else fp32. TRL's default (bf16
    # everywhere) fails on CPUs without `use_cpu` and is several times slower than fp32 on CPUs that emulate bf16.
    bf16: bool | None = None

    def __post_init__(self):
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"Unknown tasks {sorted(unknown)}; choose from {list(TASKS)}.")
        for name in ("cell_encoder_mode", "qformer_mode"):
            if getattr(self, name) not in ("frozen", "lora", "full"):
                raise ValueError(f"{name}={getattr(self, name)!r}: use 'frozen', 'lora' or 'full'.")
        if self.bf16 is None:
            from modeling_scmmgpt.utils import cpu_has_native_bf16

            gpu = torch.cuda.is_available() and not self.use_cpu
            self.bf16 = torch.cuda.is_bf16_supported() if gpu else cpu_has_native_bf16()
            self.use_cpu = self.use_cpu or (self.bf16 and not gpu)
        super().__post_init__()


class ScMMGPTInstructionCollator:
    """Builder examples (`cell_id`, `gene_ids`, `values`, `cell_type`, `description`, ...) to instruction batches.

    Each cell gives one example per task. Texts are right-padded; `labels` are -100 outside the responses. Cells that
    are read go to `cell_*`, cells to write to `target_cell_*` (with their `target_cell_expression`).
    """

    def __init__(self, processor, tasks=TASKS, seed: int = 0, max_length: int | None = None):
        self.processor, self.tasks, self.seed, self.max_length = processor, tuple(tasks), seed, max_length

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        texts, prompts, read, written = [], [], [], []
        for record in features:
            for example in instruction_examples(record, seed=self.seed):
                if example["task"] not in self.tasks:
                    continue
                cell = {"gene_ids": record["gene_ids"], "values": record["values"], "cell_id": record.get("cell_id")}
                (read if example["cell_role"] == "input" else written).append(cell)
                prompts.append(self.processor.build_prompt(example["prompt"], with_cell=False))
                texts.append(self.processor.build_prompt(example["prompt"], with_cell=False, response=example["response"]))
        batch = self.processor(
            text=texts, cells=read or None, target_cells=written or None, padding=True, padding_side="right",
            add_special_tokens=False,
        )  # fmt: skip
        batch["labels"] = self._response_labels(batch["input_ids"], batch["attention_mask"], prompts)
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            raise ValueError(
                f"An instruction example has {batch['input_ids'].shape[1]} tokens, more than max_length="
                f"{self.max_length}; truncating would cut cell spans. Raise max_length or shorten the descriptions."
            )
        return dict(batch)

    def _response_labels(self, input_ids, attention_mask, prompts) -> torch.Tensor:
        tokenizer = self.processor.tokenizer
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        for row, prompt in enumerate(prompts):
            prefix = tokenizer(self.processor.expand_cell_placeholders(prompt), add_special_tokens=False)["input_ids"]
            if input_ids[row, : len(prefix)].tolist() != prefix:
                raise ValueError(
                    "The chat template tokenises the prompt differently on its own and inside the full example, so "
                    "the response cannot be located; use a chat template whose prompt is a prefix of the dialogue."
                )
            labels[row, : len(prefix)] = -100
        return labels


def _lora_config(args: ScMMGPTInstructionArguments, model):
    from peft import LoraConfig

    targets = []
    if args.use_lora:
        targets.append(rf"model\.language_model\..*\.{ATTENTION_PROJECTIONS}")
    if args.cell_encoder_mode == "lora":
        targets.append(rf"model\.cell_tower\.cell_model\..*\.{ATTENTION_PROJECTIONS}")
    if args.qformer_mode == "lora":  # BERT naming: attention.attention.{query,key,value}, crossattention too
        targets.append(r"model\.cell_tower\.qformer\..*\.(query|key|value)")
    if not targets:
        return None
    modules_to_save = list(BRIDGE_MODULES)
    if args.cell_encoder_mode == "full":
        modules_to_save.append("cell_model")
    if args.qformer_mode == "full":
        modules_to_save += ["qformer", "query_tokens"]
    return LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules="|".join(f"({t})" for t in targets), modules_to_save=modules_to_save,
    )  # fmt: skip


def _set_trainable(model, args: ScMMGPTInstructionArguments) -> None:
    """Without LoRA: the same choices as plain `requires_grad` switches (the LM then trains in full)."""
    tower = model.model.cell_tower
    tower.cell_model.requires_grad_(args.cell_encoder_mode == "full")
    tower.qformer.requires_grad_(args.qformer_mode == "full")
    tower.query_tokens.requires_grad_(args.qformer_mode == "full")


class ScMMGPTInstructionTrainer(AtomicCheckpointsMixin, SFTTrainer):
    """`SFTTrainer` for scMMGPT instruction tuning.

    The loss is the model's own: response-token LM loss plus, for generate examples, the cell-regression and
    expression losses (TRL's fused LM head would see the LM loss only). Loss parts are logged. Checkpoints are
    atomic ([`AtomicCheckpointsMixin`]).

    Args:
        model ([`ScMMGPTForConditionalGeneration`]): the model after the first two stages.
        args ([`ScMMGPTInstructionArguments`]).
        processor ([`ScMMGPTProcessor`]): builds the batches and is saved with the checkpoints.
        train_dataset, eval_dataset: builder datasets (e.g. `load_pbmc_demo()["train"]`), map-style or streaming.
    """

    def __init__(self, model, args: ScMMGPTInstructionArguments, processor, train_dataset=None, eval_dataset=None,
                 data_collator=None, **kwargs):  # fmt: skip
        self.processor = processor
        data_collator = data_collator or ScMMGPTInstructionCollator(
            processor, tasks=args.tasks, seed=args.instruction_seed, max_length=args.max_length
        )
        peft_config = kwargs.pop("peft_config", None) or _lora_config(args, model)
        if peft_config is None:
            _set_trainable(model, args)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processor, peft_config=peft_config, **kwargs,
        )  # fmt: skip
        self._loss_parts: dict[str, list[float]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        mode = "train" if model.training else "eval"
        for name in LOSS_PARTS:
            value = getattr(outputs, name)
            if value is not None:
                self._loss_parts.setdefault(f"{mode}_{name}" if mode == "eval" else name, []).append(float(value.detach()))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean of each loss part since the last log, over the batches of all ranks."""
        prefix = "eval_" if any(k.startswith("eval_") for k in logs) else ""
        names = [prefix + name for name in LOSS_PARTS]
        logs.update(mean_over_ranks(self, self._loss_parts, names))
        for name in names:
            self._loss_parts.pop(name, None)
        super().log(logs, start_time)

    def save_merged(self, output_dir: str | os.PathLike) -> None:
        """Merges the LoRA adapters into the weights and saves a full safetensors checkpoint plus the processor."""
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model.save_pretrained(output_dir)
        self.processor.save_pretrained(output_dir)


__all__ = ["ScMMGPTInstructionArguments", "ScMMGPTInstructionCollator", "ScMMGPTInstructionTrainer"]
