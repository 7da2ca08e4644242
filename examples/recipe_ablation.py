"""Each option of the demo's training recipe switched off in turn: zero-shot annotation of the PBMC test split after
stage 1 (contrastive) and stage 2 (reconstruction), over several seeds (mean and range).

    python examples/recipe_ablation.py --output-dir runs/ablation                        # tiny LM, ~25 s a run
    python examples/recipe_ablation.py --output-dir runs/ablation --language-model smollm2 --variants recipe

Stage 3 is left out: it keeps the cell side frozen, so zero-shot annotation is fixed after stage 2. The variants
start from the demo's own stage flags (`scmmgpt.demo.STAGE_FLAGS`, the `--fast` step counts for the tiny LM
and the full ones for SmolLM2), so the ablation measures the recipe the demo runs.
"""

import argparse
import json
import os
import shutil
import time


VARIANTS = {
    "recipe": {},
    "no cell summary": {"contrastive": ["--cell_summary", "false", "--gene_embedding_init", "random"]},
    "cell summary, random gene embeddings": {"contrastive": ["--gene_embedding_init", "random"]},
    "no contrastive BatchNorm": {"contrastive": ["--contrastive_batch_norm", "false"]},
    "with ITM (itm_loss_weight 1)": {"contrastive": ["--itm_loss_weight", "1"]},
    "text path at the base rate": {"contrastive": ["--text_path_learning_rate", "null"]},
    "stage 2 trains the cell path": {"reconstruction": ["--cell_path_learning_rate", "null"]},
    "none (the previous recipe)": {
        "contrastive": [
            "--cell_summary",
            "false",
            "--gene_embedding_init",
            "random",
            "--contrastive_batch_norm",
            "false",
            "--itm_loss_weight",
            "1",
            "--text_path_learning_rate",
            "null",
        ],
        "reconstruction": ["--cell_path_learning_rate", "null", "--unexpressed_genes", "0"],
    },
}


def _without_nulls(argv: list[str]) -> list[str]:
    """Drops `--flag value` pairs, earlier or null, for a flag that a later `--flag null` resets to its default."""
    reset = {argv[i] for i in range(len(argv) - 1) if argv[i].startswith("--") and argv[i + 1] == "null"}
    out, i = [], 0
    while i < len(argv):
        if argv[i] in reset:
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def run(variant: str, seed: int, root: str, smollm2: bool) -> dict:
    from scmmgpt.demo import PRETRAINED_TEXT_FLAGS, STAGE_FLAGS, demo_argv
    from trainers.run import run_stage

    common = demo_argv(seed, os.path.join(root, "hf_cache"), "smollm2" if smollm2 else "tiny")
    common += ["--max_eval_samples", "64", "--disable_tqdm", "true"]
    out, previous = {}, None
    for stage in ("contrastive", "reconstruction"):
        flags, steps = STAGE_FLAGS[stage]
        folder = os.path.join(root, f"{variant.replace(' ', '_')}-{seed}", stage)
        shutil.rmtree(folder, ignore_errors=True)
        argv = [*common, *flags, "--max_steps", str(steps[1] if smollm2 else steps[0]), "--output_dir", folder]
        argv += PRETRAINED_TEXT_FLAGS.get(stage, []) if smollm2 else []
        argv += VARIANTS[variant].get(stage, [])
        if previous:
            argv += ["--model_name_or_path", previous]
        start = time.time()
        run_stage(stage, _without_nulls(argv))
        out[stage] = {"seconds": round(time.time() - start), **zero_shot(folder, seed, root)}
        previous = folder
    return out


def zero_shot(folder: str, seed: int, root: str) -> dict:
    from modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTProcessor
    from scmmgpt.evaluation import evaluate_annotation
    from trainers.data import load_pbmc_demo

    model = ScMMGPTForConditionalGeneration.from_pretrained(folder).eval()
    processor = ScMMGPTProcessor.from_pretrained(folder)
    splits = load_pbmc_demo(
        gene_vocab=processor.feature_extractor.gene_vocab, seed=seed, cache_dir=os.path.join(root, "hf_cache")
    )
    scores = evaluate_annotation(model, processor, splits["train"], splits["test"], modes=("zero-shot",))
    return {k: scores["model_zero-shot"][k] for k in ("accuracy", "macro_f1")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--language-model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        metavar="VARIANT",
        help=f"default: all of {list(VARIANTS)} (the text-path one with SmolLM2 only, whose MiniLM "
        "text path is pretrained)",
    )
    args = parser.parse_args(argv)
    if not args.variants:
        args.variants = [v for v in VARIANTS if args.language_model == "smollm2" or v != "text path at the base rate"]
    results = {
        v: [run(v, s, args.output_dir, args.language_model == "smollm2") for s in args.seeds] for v in args.variants
    }
    print(f"\nzero-shot annotation, PBMC test split, {args.language_model} LM, seeds {args.seeds}: mean [min, max]")
    print(
        "| variant | after stage 1: accuracy | macro-F1 | after stage 2: accuracy | macro-F1 |\n|---|---|---|---|---|"
    )
    for variant, runs in results.items():
        cells = []
        for stage in ("contrastive", "reconstruction"):
            for key in ("accuracy", "macro_f1"):
                values = [r[stage][key] for r in runs]
                cells.append(f"{sum(values) / len(values):.3f} [{min(values):.3f}, {max(values):.3f}]")
        print(f"| {variant} | " + " | ".join(cells) + " |")
    from modeling_scmmgpt.utils import atomic_write_text

    atomic_write_text(os.path.join(args.output_dir, "ablation.json"), json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
