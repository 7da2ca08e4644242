"""Running the stages from a config: one stage (`run_stage`) or all three in order (`pretrain_all`).

Shared by `examples/train_*.py`, `examples/pretrain_all.py` and `scmmgpt train`. A stage whose output folder holds
a finished model (`stage_complete.json`) is reused; one with checkpoints resumes from the last complete one.
"""

from __future__ import annotations

import json
import os
import time

from transformers import HfArgumentParser, TrainerCallback

from .arguments import ScMMGPTContrastiveArguments, ScMMGPTModelDataArguments, ScMMGPTReconstructionArguments
from .collators import ScMMGPTContrastiveCollator, ScMMGPTReconstructionCollator
from .common import load_model_and_pbmc, parse_stage_args, world
from .contrastive import ScMMGPTContrastiveTrainer
from .instruction import ScMMGPTInstructionArguments, ScMMGPTInstructionTrainer
from .reconstruction import ScMMGPTReconstructionTrainer

STAGES = {
    "contrastive": ScMMGPTContrastiveArguments,
    "reconstruction": ScMMGPTReconstructionArguments,
    "instruction": ScMMGPTInstructionArguments,
}
COMPLETE = "stage_complete.json"


def _trainer(stage: str, model, processor, args, data, callbacks):
    splits = {"train_dataset": data["train"], "eval_dataset": data["validation"], "callbacks": callbacks}
    if stage == "contrastive":
        collator = ScMMGPTContrastiveCollator(processor, max_text_length=args.max_text_length,
                                              text_field=args.text_field, label_field=args.label_field)  # fmt: skip
        return ScMMGPTContrastiveTrainer(model=model, args=args, processor=processor, data_collator=collator, **splits)
    if stage == "reconstruction":
        collator = ScMMGPTReconstructionCollator(processor)
        return ScMMGPTReconstructionTrainer(model=model, args=args, processor=processor, data_collator=collator, **splits)
    return ScMMGPTInstructionTrainer(model, args, processor, **splits)


class BaselineEvaluation(TrainerCallback):
    """Evaluates once as training begins, after `Trainer` has wrapped the model for data parallelism and loaded the
    checkpoint it resumes from. An `evaluate()` before `train()` would prepare the model for evaluation only, and
    `train()` would then leave it unwrapped: with several ranks, each would train its own copy."""

    def __init__(self, trainer):
        self.trainer, self.metrics = trainer, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.metrics = self.trainer.evaluate()


def stage_is_complete(output_dir: str) -> bool:
    return os.path.isfile(os.path.join(output_dir, COMPLETE))


def run_stage(stage: str, argv: list[str], callbacks: list[TrainerCallback] | None = None) -> dict:
    """Trains one stage from `argv` (a YAML/JSON config path first, then `--flag value` overrides) and saves the
    final model and processor in `output_dir` (the instruction stage merges its LoRA adapters, which it also keeps
    in `output_dir/adapter`, when it trains with LoRA). Returns the validation metrics before training (of the
    checkpoint it resumes from, if any) and after."""
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; choose from {list(STAGES)}.")
    parser = HfArgumentParser((ScMMGPTModelDataArguments, STAGES[stage]))
    model_args, args = parse_stage_args(parser, argv)
    if stage_is_complete(args.output_dir):
        with open(os.path.join(args.output_dir, COMPLETE), encoding="utf-8") as f:
            return json.load(f)
    model, processor, data = load_model_and_pbmc(model_args, args.seed)
    trainer = _trainer(stage, model, processor, args, data, callbacks)
    baseline = BaselineEvaluation(trainer)
    trainer.add_callback(baseline)
    resume = args.resume_from_checkpoint
    if resume in ("true", "True", "last"):
        resume = _last_checkpoint(args.output_dir)
    trainer.train(resume_from_checkpoint=resume)
    before, after = baseline.metrics, trainer.evaluate()
    if stage == "instruction":
        if hasattr(trainer.accelerator.unwrap_model(trainer.model), "peft_config"):  # LoRA: keep the adapters too
            trainer.save_model(os.path.join(args.output_dir, "adapter"))
        trainer.save_merged(args.output_dir)
    else:
        trainer.save_model(args.output_dir)  # gathers sharded (FSDP/DeepSpeed) weights
    metrics = {"stage": stage, "before": before, "after": after}
    if trainer.is_world_process_zero():
        from modeling_scmmgpt.utils import atomic_write_text

        # Published folders hold no pickles: Trainer's training_args.bin becomes JSON.
        for folder in (args.output_dir, os.path.join(args.output_dir, "adapter")):
            if os.path.exists(os.path.join(folder, "training_args.bin")):
                os.remove(os.path.join(folder, "training_args.bin"))
        atomic_write_text(os.path.join(args.output_dir, "training_args.json"), args.to_json_string())
        atomic_write_text(os.path.join(args.output_dir, COMPLETE), json.dumps(metrics, indent=2, default=float))
    # The next stage loads this one's saved model on every rank: none may go on before rank 0 has written it.
    trainer.accelerator.wait_for_everyone()
    return metrics


def _last_checkpoint(output_dir: str) -> str | None:
    """The last complete checkpoint, or None to start fresh (so `--resume_from_checkpoint true` is safe to repeat)."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


def pretrain_all(stage_argv: dict[str, list[str]], output_root: str, model: str | None = None, callbacks=None) -> dict:
    """The three stages in order, each starting from the previous stage's saved model in `output_root/<stage>`.
    `stage_argv` maps each stage to its arguments (a YAML/JSON config path first and/or `--flag value` pairs).
    Finished stages are reused and interrupted ones resume; a line per stage reports its validation loss."""
    results, previous = {}, model
    for stage in STAGES:
        argv = [*stage_argv[stage], "--output_dir", os.path.join(output_root, stage), "--resume_from_checkpoint", "true"]
        if previous is not None:
            argv += ["--model_name_or_path", previous]
        start = time.time()
        results[stage] = run_stage(stage, argv, callbacks)
        before, after = results[stage]["before"]["eval_loss"], results[stage]["after"]["eval_loss"]
        if world()[0] == 0:  # one line per stage, not one per rank
            print(f"  stage {stage:>14}: validation loss {before:.3f} -> {after:.3f} ({time.time() - start:.0f}s)", flush=True)
        previous = os.path.join(output_root, stage)
    return results


__all__ = ["STAGES", "pretrain_all", "run_stage", "stage_is_complete"]
