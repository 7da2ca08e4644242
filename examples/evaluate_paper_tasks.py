"""The paper's three evaluations on the PBMC demo's test split, next to the baselines, as one table and a JSON file.

    # a trained model folder (e.g. the output of examples/pretrain_all.py)
    python examples/evaluate_paper_tasks.py --model runs/pbmc/instruction --output-json runs/pbmc/metrics.json

    # zero-shot annotation of cell types that training never saw (train with the same --holdout-types)
    python examples/evaluate_paper_tasks.py --model runs/holdout/instruction --holdout-types "CD56+ NK" Dendritic

Without `--model` it evaluates an untrained tiny model: a floor to compare trained models against.
"""

from scmmgpt.evaluation import main


if __name__ == "__main__":
    main()
