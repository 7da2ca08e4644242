"""Running the stages from a config: one stage (`run_stage`) or all three in order (`pretrain_all`).

Shared by `examples/train_*.py`, `examples/pretrain_all.py` and `scmmgpt train`. A stage whose output folder holds
a finished model (`stage_complete.json`) is reused; one with checkpoints resumes from the last complete one.
"""

from __future__ import annotations

import json
import logging
import os
import time

from transformers import HfArgumentParser, TrainerCallback

from modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTForPreTraining

from .arguments import ScMMGPTContrastiveArguments, ScMMGPTModelDataArguments, ScMMGPTReconstructionArguments
from .collators import ScMMGPTContrastiveCollator, ScMMGPTReconstructionCollator
from .common import data_parallel_wrapper, load_model_and_data, parse_stage_args, world
from .contrastive import ScMMGPTContrastiveTrainer
from .instruction import ScMMGPTInstructionArguments, ScMMGPTInstructionTrainer
from .open_set import contrastive_features_trained, fit_open_set_reference_
from .reconstruction import ScMMGPTReconstructionTrainer


STAGES = {
    "contrastive": ScMMGPTContrastiveArguments,
    "reconstruction": ScMMGPTReconstructionArguments,
    "instruction": ScMMGPTInstructionArguments,
}
COMPLETE = "stage_complete.json"
logger = logging.getLogger(__name__)


def _trainer(stage: str, model, processor, args, data, callbacks):
    splits = {"train_dataset": data["train"], "eval_dataset": data["validation"], "callbacks": callbacks}
    if stage == "contrastive":
        collator = ScMMGPTContrastiveCollator(
            processor, max_text_length=args.max_text_length, text_field=args.text_field, label_field=args.label_field
        )
        return ScMMGPTContrastiveTrainer(model=model, args=args, processor=processor, data_collator=collator, **splits)
    if stage == "reconstruction":
        collator = ScMMGPTReconstructionCollator(processor)
        return ScMMGPTReconstructionTrainer(
            model=model, args=args, processor=processor, data_collator=collator, **splits
        )
    return ScMMGPTInstructionTrainer(model, args, processor, **splits)


class BaselineEvaluation(TrainerCallback):
    """Evaluates once as training begins, after `Trainer` has wrapped the model for data parallelism and loaded the
    checkpoint it resumes from. An `evaluate()` before `train()` would prepare the model for evaluation only, and
    `train()` would then leave it unwrapped: with several ranks, each would train its own copy."""

    def __init__(self, trainer):
        self.trainer, self.metrics = trainer, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.metrics = self.trainer.evaluate()


def model_class_for(stage: str):
    """The model class a stage trains: the pre-training stages' model computes their loss itself."""
    return ScMMGPTForConditionalGeneration if stage == "instruction" else ScMMGPTForPreTraining


def stage_is_complete(output_dir: str) -> bool:
    return os.path.isfile(os.path.join(output_dir, COMPLETE))


def parse_stage(stage: str, argv: list[str]) -> tuple:
    """`(ScMMGPTModelDataArguments, <stage>Arguments)` from `argv`: a YAML/JSON config path first, then `--flag value`
    overrides (no abbreviations; unknown keys are refused by name)."""
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; choose from {list(STAGES)}.")
    return tuple(
        parse_stage_args(
            HfArgumentParser((ScMMGPTModelDataArguments, STAGES[stage]), allow_abbrev=False, exit_on_error=False), argv
        )
    )


def run_stage(
    stage: str,
    argv: list[str] | None = None,
    callbacks: list[TrainerCallback] | None = None,
    arguments: tuple | None = None,
) -> dict:
    """Trains one stage from `arguments` (parsed, as [`parse_stage`] returns them) or from `argv`, and saves the
    final model and processor in `output_dir` (the instruction stage merges its LoRA adapters, which it also keeps
    in `output_dir/adapter`, when it trains with LoRA), with its open-set reference (`trainers.open_set`). Returns
    the validation metrics before training (of the checkpoint it resumes from, if any) and after, and what the
    open-set reference was fitted on."""
    model_args, args = arguments if arguments is not None else parse_stage(stage, argv)
    resume = _resume_point(stage, args)
    if resume is None and stage_is_complete(args.output_dir):
        with open(os.path.join(args.output_dir, COMPLETE), encoding="utf-8") as f:
            return json.load(f)
    model, processor, data = load_model_and_data(model_args, args.seed, model_class_for(stage))
    trainer = _trainer(stage, model, processor, args, data, callbacks)
    if getattr(args, "decoder_fit_only", False):  # the trainer has fitted the decoder; no step to take
        before = after = trainer.evaluate()
    else:
        baseline = BaselineEvaluation(trainer)
        trainer.add_callback(baseline)
        trainer.train(resume_from_checkpoint=resume or None)
        before, after = baseline.metrics, trainer.evaluate()
    open_set = _fit_open_set(trainer, model_args, data)
    if stage == "instruction":
        if hasattr(trainer.accelerator.unwrap_model(trainer.model), "peft_config"):  # LoRA: keep the adapters too
            trainer.save_model(os.path.join(args.output_dir, "adapter"))
        trainer.save_merged(args.output_dir)
    else:
        trainer.save_model(args.output_dir)  # gathers sharded (FSDP/DeepSpeed) weights
    metrics = {"stage": stage, "before": before, "after": after, "open_set": open_set}
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


def _fit_open_set(trainer, model_args, data) -> dict:
    """The open-set reference of the trained model (`trainers.open_set`), fitted where this stage trained the
    contrastive features or the model has none yet (a stage on a frozen cell path keeps the reference of the stage
    that trained it, and so the types that stage aligned), and where every rank holds whole weights (the ranks
    compute the same reference); sharded runs skip it, with a warning."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not model_args.open_set_reference_cells:
        return {}
    if model.config.open_set_labels and not contrastive_features_trained(model):
        return {"kept": "this stage did not train the contrastive features; the reference of the stage that did"}
    wrapper = data_parallel_wrapper(trainer.model_wrapped)
    if wrapper not in (None, "DDP"):
        logger.warning(
            "%s shards the weights: no open-set reference is saved, so zero-shot annotation will not tell new cell "
            "types from trained ones (trainers.open_set.fit_open_set_reference_ on the saved model adds one).",
            wrapper,
        )
        return {}
    return fit_open_set_reference_(
        model,
        trainer.processing_class,
        data["train"],
        data["validation"],
        reference_cells=model_args.open_set_reference_cells,
        quantile=model_args.open_set_quantile,
    )


def parse_stage_for_plan(stage: str, argv: list[str]) -> tuple:
    """[`parse_stage`] on any machine: TrainingArguments refuses bf16 without a GPU unless told to use the CPU, so
    on a CPU a GPU config is parsed with `--use_cpu true` to print its plan."""
    import torch

    return parse_stage(stage, [*argv, "--use_cpu", "true"] if not torch.cuda.is_available() else argv)


def plan_stage(stage: str, arguments: tuple) -> dict:
    """What [`run_stage`] would do with `arguments`, resolved without loading a model or reading any data: the data
    source, the model it starts from, the steps and the output folder (for `--dry-run`)."""
    model_args, args = arguments
    data = (
        "embedded PBMC demo (scanpy pbmc68k_reduced)"
        if model_args.uses_demo_data
        else {
            split: sources
            for split, sources in (
                ("train", model_args.train_data),
                ("validation", model_args.validation_data),
                ("test", model_args.test_data),
            )
            if sources
        }
    )
    return {
        "stage": stage,
        "data": data,
        "obs_filter": model_args.obs_filter,
        "columns": {
            "label": model_args.label_column,
            "ontology_id": model_args.ontology_id_column,
            "tissue": model_args.tissue_column,
            "disease": model_args.disease_column,
            "donor": model_args.donor_column,
            "gene": model_args.gene_column,
        },
        "values": "raw" if model_args.use_raw else (model_args.layer or "X"),
        "streaming": model_args.streaming,
        "model": model_args.model_name_or_path or f"embedded default model ({model_args.demo_language_model} LM)",
        "steps": args.max_steps if args.max_steps > 0 else f"{args.num_train_epochs:g} epoch(s)",
        "batch_size_per_device": args.per_device_train_batch_size,
        "learning_rate": args.learning_rate,
        "precision": "bf16"
        if args.bf16
        else "fp16"
        if args.fp16
        else "fp32 (or the CPU's native bf16 where the stage picks it)",
        "output_dir": args.output_dir,
        "complete": stage_is_complete(args.output_dir),
    }


def _resume_point(stage: str, args) -> str | None:
    """Where a stage starts, said out loud: a re-run over a folder with checkpoints resumes from the last complete
    one (the default), starts over after deleting them (`overwrite_output_dir`), or, with `resume_from_checkpoint
    false`, refuses. Returns the checkpoint to resume from, `""` to train from the start, or `None` to reuse a
    finished stage."""
    import glob
    import shutil

    out = args.output_dir
    saved = sorted(glob.glob(os.path.join(out, "checkpoint-*"))) if os.path.isdir(out) else []
    if args.overwrite_output_dir:
        if (saved or stage_is_complete(out)) and world()[0] == 0:
            logger.warning(
                "%s: overwrite_output_dir: deleting %d checkpoint(s)%s and starting over.",
                out,
                len(saved),
                " and the finished model" if stage_is_complete(out) else "",
            )
            for path in [*saved, *glob.glob(os.path.join(out, ".tmp-checkpoint-*"))]:
                shutil.rmtree(path, ignore_errors=True)
            for name in (COMPLETE, "model.safetensors"):
                if os.path.exists(os.path.join(out, name)):
                    os.remove(os.path.join(out, name))
        return ""
    if stage_is_complete(out):
        logger.warning(
            "%s: the %s stage is complete; reusing it (overwrite_output_dir true trains it again).", out, stage
        )
        return None
    requested = None if args.resume_from_checkpoint is None else str(args.resume_from_checkpoint)
    last = _last_checkpoint(out)
    if requested is not None and requested.lower() in ("false", "no") and saved:
        raise ValueError(
            f"{out} holds {len(saved)} checkpoint(s) of an unfinished run (the last: "
            f"{os.path.basename(last or saved[-1])}) and resume_from_checkpoint is false: pass "
            "overwrite_output_dir true to delete them and start over, or drop resume_from_checkpoint to "
            "resume."
        )
    if requested is not None and requested.lower() not in ("true", "last", "false", "no"):
        return requested  # a checkpoint the user named
    if last:
        logger.warning("%s: resuming the %s stage from %s (overwrite_output_dir true starts over).", out, stage, last)
    return last or ""


def _last_checkpoint(output_dir: str) -> str | None:
    """The last complete checkpoint, or None to start fresh (so `--resume_from_checkpoint true` is safe to repeat)."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


def pretrain_all(
    stage_argv: dict[str, list[str]], output_root: str, model: str | None = None, callbacks=None, dry_run: bool = False
) -> dict:
    """The three stages in order, each starting from the previous stage's saved model in `output_root/<stage>`.
    `stage_argv` maps each stage to its arguments (a YAML/JSON config path first and/or `--flag value` pairs).
    Finished stages are reused and interrupted ones resume; a line per stage reports its validation loss. With
    `dry_run`, returns each stage's [`plan_stage`] instead, training nothing."""
    results, previous = {}, model
    for stage in STAGES:
        model_args, args = (parse_stage_for_plan if dry_run else parse_stage)(stage, stage_argv[stage])
        args.output_dir, args.resume_from_checkpoint = os.path.join(output_root, stage), "true"
        if previous is not None:
            model_args.model_name_or_path = previous
        previous = args.output_dir
        if dry_run:
            results[stage] = plan_stage(stage, (model_args, args))
            continue
        start = time.time()
        results[stage] = run_stage(stage, callbacks=callbacks, arguments=(model_args, args))
        before, after = results[stage]["before"]["eval_loss"], results[stage]["after"]["eval_loss"]
        if world()[0] == 0:  # one line per stage, not one per rank
            print(
                f"  stage {stage:>14}: validation loss {before:.3f} -> {after:.3f} ({time.time() - start:.0f}s)",
                flush=True,
            )
    return results


__all__ = ["STAGES", "parse_stage", "plan_stage", "pretrain_all", "run_stage", "stage_is_complete"]
