"""Stage 3, instruction tuning: interleaved cell/text instructions for the three tasks on TRL's `SFTTrainer`.

Describe and annotate examples read a cell (`<cell>` in the prompt); generate examples write one (the response is
the cell span), and for those the model adds its cell-regression and expression losses to the LM loss. The LM loss
counts response tokens only. LoRA on the LM through `peft`; the cell encoder can be frozen, LoRA-adapted or trained,
the Q-Former frozen or trained; the projector, the LM-to-cell head and the expression decoder always train.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from trl import SFTConfig, SFTTrainer

from .arguments import ScMMGPTRunOptions
from .bridges import CODEBOOK_ENTRIES, fit_bridges
from .common import AtomicCheckpointsMixin, RanksInStepMixin, mean_over_ranks, regroup_optimizer, write_loss_settings
from .data.instructions import instruction_examples


logger = logging.getLogger(__name__)

TASKS = ("describe", "annotate", "generate")
LOSS_PARTS = ("lm_loss", "cell_regression_loss", "expression_loss")  # of the model's output, logged
ATTENTION_PROJECTIONS = "(q_proj|k_proj|v_proj|o_proj)"
# Always trained in full (and saved with the adapters): the parts that connect the cell and text spaces.
BRIDGE_MODULES = ["multi_modal_projector", "cell_codebook", "cell_head", "expression_decoder"]
# What each `bridge_init` fits before training (see `trainers.bridges`).
BRIDGE_INIT_PARTS = {
    "random": (),
    "least_squares": ("projector", "cell_head"),
    "label_codebook": ("codebook", "cell_head"),
}


@dataclass
class ScMMGPTInstructionArguments(ScMMGPTRunOptions, SFTConfig):
    r"""
    [`SFTConfig`] plus the instruction stage's choices.

    Args:
        tasks (`list[str]`, defaults to all three): which of `describe`, `annotate`, `generate` to train on; each cell
            gives one example per task.
        instruction_seed (`int`, defaults to 0): picks the phrasing of each instruction (per cell, the same on every
            run and rank).
        use_lora (`bool`, defaults to `True`): LoRA adapters on the LM's attention projections (the LM stays frozen).
        lora_r, lora_alpha, lora_dropout: LoRA hyper-parameters.
        lora_modules (`list[str]`, defaults to the attention projections): names of the LM's linear layers that get
            LoRA adapters (Llama naming: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
            `down_proj`). Adapters on the MLPs too give the LM more room to learn the descriptions' wording.
        cell_encoder_mode (`str`, defaults to `"frozen"`): `"frozen"`, `"lora"` (adapters on its attention
            projections) or `"full"`.
        qformer_mode (`str`, defaults to `"frozen"`): the Q-Former `"frozen"`, `"lora"` (adapters on its attention
            query/key/value) or `"full"` (with its queries).
        train_expression_decoder (`bool`, defaults to `True`): also train the expression decoder on the LM's cell
            tokens. Off keeps the decoder that stage 2 fitted on real cells' tokens, over expressed and unexpressed
            genes; the expression loss then trains the LM and `cell_head` only. Generate examples have expressed
            genes only, and while the LM's cell tokens do not yet tell types apart, training the decoder on them
            teaches it one average cell with every gene expressed.
        bridge_init (`str`, defaults to `"random"`): `"least_squares"` fits the output layers of the projector and
            `cell_head` on up to `bridge_init_cells` training cells before training (see `trainers.bridges`): cells
            start out reading like their type's name, and generated cells like their prompt's type.
            `"label_codebook"` fits `cell_head` the same way, and reads cells through a cell codebook with one entry
            per training label (`ScMMGPTConfig.cell_codebook_labels`), started from the label's token embeddings
            and mixed by a logistic regression on the cells; least squares blurs the names together.
        bridge_init_cells (`int`, defaults to 512): training cells (the first ones) for `bridge_init`.
        bridge_codebook_c (`float`, defaults to 1.0): inverse L2 strength of the codebook's logistic regression
            (scikit-learn's `C`); 0 chooses it by 5-fold cross-validation on the fitting cells, from 1e-4 to 1e2.
        bridge_codebook_confidence (`float`, *optional*): scale the codebook's logits so that the fitting cells'
            mean top probability is this (each cell's most likely label stays). A strongly regularised regression
            (`bridge_codebook_c 0`) names new cells best, but mixes label embeddings softly, which the LM reads less
            well; this keeps its choices and makes them crisp. `None`: the regression's own probabilities.
        bridge_codebook_entries (`str`, defaults to `"label"`): what the codebook's entries start from: the
            label's token embeddings, or `"label_and_name"`: the label's on the first half of the cell positions and
            its Cell Ontology name's (the name descriptions use, e.g. "CD19+ B" and "B cell") on the second.
        bridge_refit (`bool`, defaults to `True`): with a fitted `bridge_init`, fit `cell_head` again after
            training, on the adapted LM's states: the adapters move the states the first fit read.
        expression_loss_weight (`float`, *optional*): sets the model's `expression_loss_weight` (saved with it) for
            this stage. With the decoder frozen, 0 leaves the cell-regression loss to train the writing: the
            expression loss then only adds large gradients through the decoder, which clipping turns into smaller
            steps for everything else.
        balance_cell_types (`float`, defaults to 0): draw training cells with weights `count(type) ** -balance`:
            0 keeps the data's frequencies, 1 draws every cell type equally often (with replacement). A short stage 3
            sees a fraction of an epoch: at the demo's 120 cells a rare type's description was seen once or twice
            and never learnt. Needs a dataset with a length and a `cell_type` column.
        bridge_learning_rate (`float`, *optional*): learning rate of the bridges (the projector, `cell_head` and the
            expression decoder); `None` is `learning_rate`. Least-squares bridges need a lower rate than the LoRA
            adapters: at the adapters' 1e-3 their fit was lost within ten steps (cell-regression loss 0.12 -> 0.29).
    """

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    instruction_seed: int = 0
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    cell_encoder_mode: str = "frozen"
    qformer_mode: str = "frozen"
    train_expression_decoder: bool = True
    bridge_init: str = "random"
    bridge_init_cells: int = 512
    bridge_codebook_c: float = 1.0
    bridge_codebook_confidence: float | None = None
    bridge_codebook_entries: str = "label"
    bridge_learning_rate: float | None = None
    bridge_refit: bool = True
    expression_loss_weight: float | None = None
    balance_cell_types: float = 0.0
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
        if not 0 <= self.balance_cell_types <= 1:
            raise ValueError(
                f"balance_cell_types={self.balance_cell_types}: use a value from 0 (data frequencies) to 1 (equal)."
            )
        if self.bridge_codebook_c < 0:
            raise ValueError(f"bridge_codebook_c={self.bridge_codebook_c}: a positive C, or 0 to choose it by CV.")
        if self.bridge_codebook_confidence is not None and not 0 < self.bridge_codebook_confidence < 1:
            raise ValueError(
                f"bridge_codebook_confidence={self.bridge_codebook_confidence}: a mean top probability between 0 "
                "and 1 (e.g. 0.99), or leave it unset."
            )
        if self.bridge_codebook_entries not in CODEBOOK_ENTRIES:
            raise ValueError(
                f"bridge_codebook_entries={self.bridge_codebook_entries!r}: use one of {', '.join(CODEBOOK_ENTRIES)}."
            )
        if self.bridge_init not in BRIDGE_INIT_PARTS:
            raise ValueError(
                f"bridge_init={self.bridge_init!r}: use one of {', '.join(map(repr, BRIDGE_INIT_PARTS))}."
            )
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
                texts.append(
                    self.processor.build_prompt(example["prompt"], with_cell=False, response=example["response"])
                )
        batch = self.processor(
            text=texts,
            cells=read or None,
            target_cells=written or None,
            padding=True,
            padding_side="right",
            add_special_tokens=False,
        )
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


def response_token_budget(processor, dataset, max_streamed_cells: int = 512, room: int = 16) -> int:
    """Tokens for the longest text response (description or label) in `dataset`, plus `room`: the generation length
    that lets the model finish any answer it was trained on (a fixed 48 had cut the demo's longest definition, 78
    tokens, for a third of the test cells). A map-style dataset is read whole (its distinct texts are tokenised
    once); a streaming one up to `max_streamed_cells` cells."""
    if hasattr(dataset, "__len__") and {"description", "cell_type"} <= set(dataset.column_names):
        texts = set(dataset["description"]) | set(dataset["cell_type"])
    else:
        records = itertools.islice(iter(dataset), max_streamed_cells)
        texts = {e["response"] for r in records for e in instruction_examples(r) if e["cell_role"] == "input"}
    lengths = [
        len(ids) for ids in processor.tokenizer(sorted(t for t in texts if t), add_special_tokens=False)["input_ids"]
    ]
    return max(lengths, default=0) + room


def _lora_config(args: ScMMGPTInstructionArguments, model):
    from peft import LoraConfig

    targets = []
    if args.use_lora:
        targets.append(rf"model\.language_model\..*\.({'|'.join(map(re.escape, args.lora_modules))})")
    if args.cell_encoder_mode == "lora":
        targets.append(rf"model\.cell_tower\.cell_model\..*\.{ATTENTION_PROJECTIONS}")
    if args.qformer_mode == "lora":  # BERT naming: attention.attention.{query,key,value}, crossattention too
        targets.append(r"model\.cell_tower\.qformer\..*\.(query|key|value)")
    if not targets:
        return None
    modules_to_save = [m for m in BRIDGE_MODULES if args.train_expression_decoder or m != "expression_decoder"]
    if model.model.cell_codebook is None:
        modules_to_save.remove("cell_codebook")
    if args.cell_encoder_mode == "full":
        modules_to_save.append("cell_model")
    if args.qformer_mode == "full":
        modules_to_save += ["qformer", "query_tokens"]
        if model.model.cell_tower.summary_projection is not None:
            modules_to_save += ["summary_projection", "summary_bias"]
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules="|".join(f"({t})" for t in targets),
        modules_to_save=modules_to_save,
    )


def _set_trainable(model, args: ScMMGPTInstructionArguments) -> None:
    """Without LoRA: the same choices as plain `requires_grad` switches (the LM then trains in full)."""
    tower = model.model.cell_tower
    tower.cell_model.requires_grad_(args.cell_encoder_mode == "full")
    model.model.expression_decoder.requires_grad_(args.train_expression_decoder)
    for part in tower.cell_path()[1:]:  # the queries, the Q-Former and the cell summary
        part.requires_grad_(args.qformer_mode == "full")


class ScMMGPTInstructionTrainer(RanksInStepMixin, AtomicCheckpointsMixin, SFTTrainer):
    """`SFTTrainer` for scMMGPT instruction tuning.

    The loss is the model's own: response-token LM loss plus, for generate examples, the cell-regression and
    expression losses (TRL's fused LM head would see the LM loss only). Loss parts are logged. Checkpoints are
    atomic ([`AtomicCheckpointsMixin`]); with several ranks, training fails unless they train one model
    ([`RanksInStepMixin`]).

    Args:
        model ([`ScMMGPTForConditionalGeneration`]): the model after the first two stages.
        args ([`ScMMGPTInstructionArguments`]).
        processor ([`ScMMGPTProcessor`]): builds the batches and is saved with the checkpoints.
        train_dataset, eval_dataset: builder datasets (e.g. `load_pbmc_demo()["train"]`), map-style or streaming.
    """

    def __init__(
        self,
        model,
        args: ScMMGPTInstructionArguments,
        processor,
        train_dataset=None,
        eval_dataset=None,
        data_collator=None,
        **kwargs,
    ):
        self.processor = processor
        data_collator = data_collator or ScMMGPTInstructionCollator(
            processor, tasks=args.tasks, seed=args.instruction_seed, max_length=args.max_length
        )
        write_loss_settings(model, args)  # its expression_loss_weight
        if train_dataset is not None:  # saved with the model: pipelines then write whole descriptions by default
            model.generation_config.max_new_tokens = response_token_budget(
                processor, train_dataset, args.bridge_init_cells
            )
        parts = BRIDGE_INIT_PARTS[args.bridge_init]
        if parts and train_dataset is not None:
            records = list(itertools.islice(iter(train_dataset), args.bridge_init_cells))
            self.bridge_fits = fit_bridges(
                model,
                processor,
                records,
                seed=args.instruction_seed,
                parts=parts,
                codebook_c=args.bridge_codebook_c,
                codebook_confidence=args.bridge_codebook_confidence,
                codebook_entries=args.bridge_codebook_entries,
            )
            logger.info("Bridges fitted on %d training cells: %s", len(records), self.bridge_fits)
        if args.balance_cell_types and train_dataset is not None and not hasattr(train_dataset, "__len__"):
            raise ValueError(
                "balance_cell_types needs a map-style training set (its cell types are counted first); "
                "pass a datasets.Dataset, not a streaming one, or set balance_cell_types 0."
            )
        peft_config = kwargs.pop("peft_config", None) or _lora_config(args, model)
        if peft_config is None:
            _set_trainable(model, args)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processor,
            peft_config=peft_config,
            **kwargs,
        )
        self._loss_parts: dict[str, list[float]] = {}

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if (
            "cell_head" in BRIDGE_INIT_PARTS[self.args.bridge_init]
            and self.args.bridge_refit
            and self.train_dataset is not None
        ):
            records = list(itertools.islice(iter(self.train_dataset), self.args.bridge_init_cells))
            model = self.accelerator.unwrap_model(self.model)
            model = model.get_base_model() if hasattr(model, "get_base_model") else model
            self.bridge_fits.update(
                fit_bridges(model, self.processor, records, self.args.instruction_seed, parts=("cell_head",))
            )
            logger.info("cell_head refitted on the adapted LM: %s", self.bridge_fits)
        return output

    def _get_train_sampler(self, train_dataset=None):
        """With `balance_cell_types`, cells drawn with weights `count(type) ** -balance` (seeded with `args.seed`, so
        every rank draws the same order and takes its own share of each batch)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.args.balance_cell_types or dataset is None:
            return super()._get_train_sampler(train_dataset)
        labels = list(dataset["cell_type"])
        counts = Counter(labels)
        weights = [counts[label] ** -self.args.balance_cell_types for label in labels]
        generator = torch.Generator().manual_seed(self.args.seed)
        return torch.utils.data.WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator)

    def create_optimizer(self, model=None):
        """SFTTrainer's optimizer, with the bridges at `args.bridge_learning_rate` when it is set."""
        optimizer = super().create_optimizer(model)
        if self.args.bridge_learning_rate is None:
            return optimizer
        base = self.accelerator.unwrap_model(self.model)
        bridges = [p for n, p in base.named_parameters() if p.requires_grad and any(m in n for m in BRIDGE_MODULES)]
        return regroup_optimizer(optimizer, [(bridges, self.args.bridge_learning_rate)])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        mode = "train" if model.training else "eval"
        for name in LOSS_PARTS:
            value = getattr(outputs, name)
            if value is not None:
                self._loss_parts.setdefault(f"{mode}_{name}" if mode == "eval" else name, []).append(
                    float(value.detach())
                )
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


__all__ = [
    "ScMMGPTInstructionArguments",
    "ScMMGPTInstructionCollator",
    "ScMMGPTInstructionTrainer",
    "response_token_budget",
]
