"""Training throughput and peak memory of each stage trainer against a bare `transformers.Trainer` doing the same
forward and backward on the same model, batches, optimiser and schedule.

    python benchmarks/train_step.py [--steps 20] [--lm tiny|smollm2] [--stages contrastive reconstruction instruction]
        [--precision]

"Ours" is the stage trainer as `scmmgpt train` builds it (loss parts collected and averaged over ranks for logging,
seeded per-step draws, unused modules frozen). "Bare" is a plain `Trainer` on the same model: for the pre-training
stages `ScMMGPTForPreTraining`, whose forward computes the stage's loss; for the instruction stage the model's loss
with the same LoRA adapters from peft. Neither saves checkpoints. Speed: both
trainers alternate `--repeats` times in one process on copies of one model (separate processes differed by up to
30% on this shared 2-core machine); samples/s is at the median step time after `--warmup`, median over repeats.
Peak RSS: one process per trainer. Target: ours at most 10% slower than bare.

`--precision` instead times our trainer per stage in fp32 and in bf16 (Trainer's `bf16=True`, autocast), the same
way (alternating in one process, medians), and prints the precision each stage picks by default on this machine,
so that a default is backed by a measurement. The first line names the CPU and its flags.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = {"contrastive": 16, "reconstruction": 32, "instruction": 2}  # cells per step, as the demo trains
PRECISIONS = ("fp32", "bf16")


def _stage_args(stage: str, steps: int, lm: str, cache: str) -> list[str]:
    from scmmgpt.demo import demo_argv

    return [
        *demo_argv(0, cache, lm),
        *("--output_dir", os.path.join(cache, "runs", stage), "--max_steps", str(steps), "--logging_steps", "5"),
        *("--per_device_train_batch_size", str(BATCH[stage]), "--learning_rate", "1e-4", "--disable_tqdm", "true"),
    ]


def _bare_trainer(stage: str, model, processor, args, data, callbacks):
    from transformers import Trainer

    from trainers.collators import ScMMGPTContrastiveCollator, ScMMGPTReconstructionCollator
    from trainers.common import base_model, freeze_unused
    from trainers.contrastive import ScMMGPTContrastiveTrainer
    from trainers.instruction import ScMMGPTInstructionCollator, _lora_config
    from trainers.reconstruction import ScMMGPTReconstructionTrainer

    common = dict(args=args, train_dataset=data["train"], callbacks=callbacks)
    if stage == "instruction":
        from peft import get_peft_model

        collator = ScMMGPTInstructionCollator(processor, tasks=args.tasks, seed=args.instruction_seed)
        return Trainer(model=get_peft_model(model, _lora_config(args, model)), data_collator=collator, **common)
    ours = {"contrastive": ScMMGPTContrastiveTrainer, "reconstruction": ScMMGPTReconstructionTrainer}[stage]
    # The same trainable parameters as ours (a model set-up choice, not trainer overhead); the loss is the model's
    # own (ScMMGPTForPreTraining computes it), with torch's global generator for its draws.
    freeze_unused(model, ours.used_modules(None, base_model(model), args))
    if stage == "contrastive":
        collator = ScMMGPTContrastiveCollator(
            processor, max_text_length=args.max_text_length, text_field=args.text_field, label_field=args.label_field
        )
    else:
        collator = ScMMGPTReconstructionCollator(processor)
    return Trainer(model=model, data_collator=collator, **common)


def _median_step_samples_per_s(stage, mode, model, processor, args, data, warmup) -> float:
    """Trains a fresh copy of `model` for `args.max_steps`; samples/s at the median step time after `warmup` (the
    median is robust to the odd stall of a shared machine)."""
    import copy
    import dataclasses

    from transformers import TrainerCallback

    from trainers.run import _trainer

    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, *unused, **kwargs):
            stamps.append(time.perf_counter())

    if mode in PRECISIONS:  # our trainer in that precision (Trainer's bf16 autocast, or fp32)
        args = dataclasses.replace(args, bf16=mode == "bf16", use_cpu=args.use_cpu or mode == "bf16")
    build = _bare_trainer if mode == "bare" else _trainer
    build(stage, copy.deepcopy(model), processor, args, data, [Clock()]).train()
    step_seconds = sorted(b - a for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:]))
    return BATCH[stage] / step_seconds[len(step_seconds) // 2]


def run_one(stage: str, modes: list[str], steps: int, warmup: int, lm: str, cache: str, repeats: int) -> dict:
    """In this process: each of `modes` trained `repeats` times, alternating, on copies of one model (so both see
    the same machine state and memory layout). Returns the median samples/s per mode and the process's peak RSS."""
    from transformers import HfArgumentParser

    from trainers.arguments import ScMMGPTModelDataArguments
    from trainers.common import load_model_and_data, parse_stage_args
    from trainers.run import STAGES, model_class_for

    parser = HfArgumentParser((ScMMGPTModelDataArguments, STAGES[stage]))
    model_args, args = parse_stage_args(parser, _stage_args(stage, warmup + steps, lm, cache))
    model, processor, data = load_model_and_data(model_args, args.seed, model_class_for(stage))
    rates = {mode: [] for mode in modes}
    for repeat in range(repeats):
        for mode in modes if repeat % 2 == 0 else modes[::-1]:  # neither always runs first
            rates[mode].append(_median_step_samples_per_s(stage, mode, model, processor, args, data, warmup))
    result = {mode: sorted(r)[len(r) // 2] for mode, r in rates.items()}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _child(stage: str, modes: list[str], repeats: int, args) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--run",
        stage,
        ",".join(modes),
        "--repeats",
        str(repeats),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--lm",
        args.lm,
        "--cache",
        args.cache,
    ]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"{stage} ({modes}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs per mode; the median counts")
    parser.add_argument("--lm", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--stages", nargs="+", default=["contrastive", "reconstruction", "instruction"])
    parser.add_argument("--cache", default=os.path.join(ROOT, "runs", "train_step_benchmark"))
    parser.add_argument("--precision", action="store_true", help="fp32 against bf16 per stage, not against bare")
    parser.add_argument("--run", nargs=2, metavar=("STAGE", "MODES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        stage, modes = args.run[0], args.run[1].split(",")
        print(json.dumps(run_one(stage, modes, args.steps, args.warmup, args.lm, args.cache, args.repeats)))
        return

    from modeling_scmmgpt.utils import cpu_flags, cpu_info

    flags = " ".join(sorted(f for f in cpu_flags() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")))
    print(f"{cpu_info('model name') or 'CPU'} ({flags or 'no avx2/avx512/amx'}), torch threads {os.cpu_count()}")
    print(
        f"LM: {args.lm}; samples/s at the median of {args.steps} step times after {args.warmup} warm-up steps, "
        f"median of {args.repeats} alternating runs in one process"
        + ("" if args.precision else "; peak RSS from one process per mode")
    )
    if args.precision:
        return _precision_table(args)
    print(f"{'stage':<15}{'bare samples/s':>16}{'ours samples/s':>16}{'overhead':>10}{'bare MB':>10}{'ours MB':>10}")
    for stage in args.stages:
        speed = _child(stage, ["bare", "ours"], args.repeats, args)
        memory = {mode: _child(stage, [mode], 1, args)["peak_rss_mb"] for mode in ("bare", "ours")}
        overhead = speed["bare"] / speed["ours"] - 1
        print(
            f"{stage:<15}{speed['bare']:>16.2f}{speed['ours']:>16.2f}{overhead:>+10.1%}"
            f"{memory['bare']:>10.0f}{memory['ours']:>10.0f}",
            flush=True,
        )
    print("overhead = bare samples/s / ours - 1; target <= +10%")


def _precision_table(args) -> None:
    """Our trainer per stage in fp32 and in bf16, and the precision the stage takes by default here."""
    import tempfile

    from trainers.run import STAGES

    print(f"{'stage':<15}{'fp32 samples/s':>16}{'bf16 samples/s':>16}{'bf16/fp32':>11}  default here")
    for stage in args.stages:
        speed = _child(stage, list(PRECISIONS), args.repeats, args)
        with tempfile.TemporaryDirectory() as tmp:
            default = STAGES[stage](output_dir=tmp, report_to="none", use_cpu=True).bf16
        print(
            f"{stage:<15}{speed['fp32']:>16.2f}{speed['bf16']:>16.2f}{speed['bf16'] / speed['fp32']:>10.2f}x  "
            f"{'bf16' if default else 'fp32'}",
            flush=True,
        )


if __name__ == "__main__":
    main()
