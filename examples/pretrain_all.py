"""The three stages in a row, each starting from the previous one's saved model, on the embedded PBMC demo.

    python examples/pretrain_all.py --output-dir runs/pbmc                       # tiny configs, minutes on 2 cores
    python examples/pretrain_all.py --output-dir runs/pbmc --override --max_steps 5
    python examples/pretrain_all.py --output-dir runs/paper --config-suffix paper   # paper scale (GPUs, see configs)

Re-running reuses finished stages and resumes an interrupted one from its last complete checkpoint. Afterwards it
reports, on the held-out test split, cell type annotation by the model before stage 3 (after reconstruction) and
after it, against chance, three generated descriptions, and generated cells for each type scored by a 5-NN
classifier on real cells (`--no-report` skips this).
"""

import argparse
import os

from trainers.run import STAGES, pretrain_all


CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--config-suffix", default="tiny", help="configs/<stage>_<suffix>.yaml")
    parser.add_argument("--model", help="start from this saved scMMGPT instead of the demo model")
    parser.add_argument("--no-report", action="store_true", help="skip the test-split report after training")
    parser.add_argument("--override", nargs=argparse.REMAINDER, default=[], help="flags passed to every stage")
    args = parser.parse_args(argv)
    stage_argv = {
        stage: [os.path.join(CONFIGS, f"{stage}_{args.config_suffix}.yaml"), *args.override] for stage in STAGES
    }
    results = pretrain_all(stage_argv, args.output_dir, model=args.model)
    if not args.no_report:
        results["report"] = report(args.output_dir)
    return results


def report(output_dir: str, seed: int = 0, cache_dir: str | None = None) -> dict:
    """Annotation before and after stage 3, descriptions and generated cells on the test split, printed."""
    from modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTProcessor
    from scmmgpt.evaluation import evaluate_annotation, evaluate_description, evaluate_generation
    from trainers.data import load_pbmc_demo

    def load(stage):
        folder = os.path.join(output_dir, stage)
        return ScMMGPTForConditionalGeneration.from_pretrained(folder).eval(), ScMMGPTProcessor.from_pretrained(folder)

    models = {"before stage 3": load("reconstruction"), "after stage 3": load("instruction")}
    model, processor = models["after stage 3"]
    # The stages chain one processor, so both models read the same gene ids.
    splits = load_pbmc_demo(gene_vocab=processor.feature_extractor.gene_vocab, seed=seed, cache_dir=cache_dir)
    out = {name: evaluate_annotation(m, p, splits["train"], splits["test"]) for name, (m, p) in models.items()}
    chance = 1 / len(set(splits["train"]["cell_type"]))
    print(
        f"Cell type annotation on {len(splits['test'])} test cells (chance {chance:.3f}; logistic regression on "
        f"expression {out['after stage 3']['baseline_logistic_regression']['accuracy']:.3f}):"
    )
    for name, result in out.items():
        for mode in ("zero-shot", "generative"):
            scores = result[f"model_{mode}"]
            print(f"  {name:>14}, {mode:>10}: accuracy {scores['accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f}")
    described = evaluate_description(model, processor, splits["train"], splits["test"].select(range(3)))
    out["descriptions"] = described["examples"]
    for example in described["examples"]:
        print(f"  described: {example['generated'][:100]!r}\n      truth: {example['reference'][:100]!r}")
    generation = evaluate_generation(model, processor, splits["train"], splits["test"], cells_per_type=2, seed=seed)
    out["generation"] = {k: generation[k]["knn_accuracy"] for k in ("model", "baseline_class_mean_plus_noise")}
    print(
        f"Generated cells (2 per type), 5-NN accuracy {out['generation']['model']:.3f} "
        f"(class mean + noise baseline {out['generation']['baseline_class_mean_plus_noise']:.3f}; chance {chance:.3f})"
    )
    return out


if __name__ == "__main__":
    main()
