"""The paper's three evaluations on the PBMC demo's test split, next to the baselines, as one table and a JSON file.

    # a trained model folder (e.g. the output of examples/pretrain_all.py)
    python examples/evaluate_paper_tasks.py --model runs/pbmc/instruction --output-json runs/pbmc/metrics.json

    # zero-shot annotation of cell types that training never saw (train with the same --holdout-types)
    python examples/evaluate_paper_tasks.py --model runs/holdout/instruction --holdout-types "CD56+ NK" Dendritic

Without `--model` it evaluates an untrained tiny model: a floor to compare trained models against.
"""

import argparse
import logging
import sys
import tempfile

import torch


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="folder with a saved ScMMGPTForConditionalGeneration and its processor")
    parser.add_argument("--output-json", help="write the results here (the model card reads this file)")
    parser.add_argument("--test-cells", type=int, default=None, help="evaluate on a seeded sample of the test split")
    parser.add_argument("--description-cells", type=int, default=None, help="describe at most this many test cells")
    parser.add_argument("--cells-per-type", type=int, default=4, help="pseudo-cells generated per cell type")
    parser.add_argument("--holdout-types", nargs="*", default=[], help="bulk_labels kept out of training")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTProcessor
    from modeling_scmmgpt.evaluation import evaluate_paper_tasks, evaluate_zero_shot_holdout, format_table
    from trainers.data import load_pbmc_demo

    torch.manual_seed(args.seed)
    if args.model:
        model = ScMMGPTForConditionalGeneration.from_pretrained(args.model)
        processor = ScMMGPTProcessor.from_pretrained(args.model)
    else:
        from modeling_scmmgpt.demo import build_model, load_pbmc

        print("No --model: evaluating an untrained tiny model (a floor, not a result).", file=sys.stderr)
        model, processor = build_model(load_pbmc(), tiny_lm=True)
    with tempfile.TemporaryDirectory() as vocab_dir:
        processor.cell_processor.gene_vocab.save_pretrained(vocab_dir)
        splits = load_pbmc_demo(gene_vocab=vocab_dir, seed=args.seed)
    train = splits["train"].filter(lambda r: r["cell_type"] not in args.holdout_types)
    test = splits["test"]
    if args.test_cells is not None:
        test = test.shuffle(seed=args.seed).select(range(min(args.test_cells, len(test))))
    results = evaluate_paper_tasks(
        model, processor, train, test, description_cells=args.description_cells,
        cells_per_type=args.cells_per_type, seed=args.seed,
    )  # fmt: skip
    if args.holdout_types:
        results["zero_shot_holdout"] = evaluate_zero_shot_holdout(model, processor, test, args.holdout_types)
    if args.output_json:
        from modeling_scmmgpt.evaluation import write_results

        write_results(results, args.output_json)
    print(f"PBMC demo test split: {results['n_test_cells']} cells; baselines fit on {results['n_train_cells']} "
          "training cells")  # fmt: skip
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
