"""The paper's three evaluations on a held-out split, each next to an honest baseline on the same cells.

- cell description: generated text against the reference descriptions (BLEU-2/4, ROUGE-1/2/L, METEOR); baseline:
  the description of the nearest training cell;
- cell type annotation: accuracy and macro-F1 of zero-shot (contrastive) and generative annotation; baseline:
  logistic regression on log-normalised expression;
- pseudo-cell generation: a 5-NN classifier trained on real cells must recognise the type each generated cell was
  asked for, plus MMD to the real cells; baseline: the class-mean cell plus per-gene noise matched to the class.

Splits are data-builder datasets (`cell_id`, `gene_ids`, `values`, `cell_type`, `cell_type_ontology_term_id`,
`description`, `tissue`); expression is compared over the genes seen in training, in the values the builder stored
(log-normalised for the PBMC demo), which is also the scale of the model's generated `expression`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import numpy as np
import scipy.sparse as sp
import torch

from modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTProcessor
from modeling_scmmgpt.metrics import CellDescriptionMetric, CellTypeAnnotationMetric, PseudoCellGenerationMetric
from modeling_scmmgpt.pipelines import CellDescriptionPipeline, CellTypeAnnotationPipeline, TextToCellPipeline
from modeling_scmmgpt.prompts import generation_prompts  # the phrasings the model was tuned on
from modeling_scmmgpt.utils import atomic_write_text
from trainers.data import load_cell_text_splits, load_pbmc
from trainers.default_model import build_model


logger = logging.getLogger(__name__)


def expression_matrix(split, n_genes: int) -> sp.csr_matrix:
    """Builder examples to a `(num_cells, n_genes)` CSR matrix indexed by gene-vocabulary id."""
    gene_ids, values = split["gene_ids"], split["values"]
    indptr = np.concatenate([[0], np.cumsum([len(g) for g in gene_ids])])
    indices = np.concatenate([np.asarray(g, dtype=np.int64) for g in gene_ids]) if len(gene_ids) else np.array([])
    data = np.concatenate([np.asarray(v, dtype=np.float32) for v in values]) if len(values) else np.array([])
    return sp.csr_matrix((data, indices, indptr), shape=(len(gene_ids), n_genes))


def _pipeline(cls, model, processor):
    return cls(model=model, processor=processor, task=None)


def evaluate_description(
    model, processor, train, test, max_new_tokens: int | None = None, batch_size: int = 16
) -> dict:
    """Model: generated descriptions (all of them under `generated`, by cell id, so callers need not generate them
    again), up to `max_new_tokens` (default: the model's generation config, which stage 3 sizes to its longest
    training response). Baseline: the nearest training cell's description (cosine on expression)."""
    metric = CellDescriptionMetric()
    references = list(test["description"])
    describer = _pipeline(CellDescriptionPipeline, model, processor)
    predictions = describer(test, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    n_genes = len(processor.feature_extractor.gene_vocab.gene_to_id)
    train_x, test_x = (_unit_rows(expression_matrix(s, n_genes)) for s in (train, test))
    nearest = np.asarray((test_x @ train_x.T).argmax(axis=1)).ravel()
    baseline = [train["description"][i] for i in nearest]
    return {
        "model": metric.compute(predictions=predictions, references=references),
        "baseline_nearest_training_cell": metric.compute(predictions=baseline, references=references),
        "examples": [{"reference": r, "generated": p} for r, p in list(zip(references, predictions))[:3]],
        "generated": dict(zip(map(str, test["cell_id"]), predictions)),
    }


def _unit_rows(matrix: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1))).ravel()
    return sp.diags(1 / np.maximum(norms, 1e-12)) @ matrix


def _zero_shot_column(*splits) -> str:
    """Zero-shot names Cell Ontology ids (scored with their definitions, as in training) when every cell has one;
    labels that did not resolve to the ontology are scored as the label text itself."""
    ids = [i for split in splits for i in split["cell_type_ontology_term_id"]]
    if all(ids):
        return "cell_type_ontology_term_id"
    logger.warning(
        "%d of %d cells have no Cell Ontology id: zero-shot annotation ranks the label texts instead.",
        sum(not i for i in ids),
        len(ids),
    )
    return "cell_type"


def evaluate_annotation(
    model, processor, train, test, modes=("zero-shot", "generative"), batch_size: int = 16
) -> dict:
    """Zero-shot ranks Cell Ontology ids (described with their definitions, as in training); generative maps the
    LM's answer to the closest training label. Baseline: logistic regression on expression."""
    from sklearn.linear_model import LogisticRegression

    metric = CellTypeAnnotationMetric()
    results = {}
    annotator = _pipeline(CellTypeAnnotationPipeline, model, processor)
    for mode in modes:
        column = _zero_shot_column(train, test) if mode == "zero-shot" else "cell_type"
        candidates = sorted(set(train[column]))
        ranked = annotator(test, candidate_labels=candidates, mode=mode, batch_size=batch_size, progress=False)
        predictions = [r[0]["label"] for r in ranked]
        results[f"model_{mode}"] = metric.compute(predictions=predictions, references=list(test[column]))
    n_genes = len(processor.feature_extractor.gene_vocab.gene_to_id)
    classifier = LogisticRegression(max_iter=2000).fit(expression_matrix(train, n_genes), train["cell_type"])
    predictions = classifier.predict(expression_matrix(test, n_genes)).tolist()
    results["baseline_logistic_regression"] = metric.compute(
        predictions=predictions, references=list(test["cell_type"])
    )
    return results


def evaluate_generation(model, processor, train, test, cells_per_type: int = 4, seed: int = 0) -> dict:
    """Generates `cells_per_type` cells per test type (one per prompt phrasing, each phrasing cycled with a new seed)
    and scores them against the real test cells. Baseline: the training class mean plus per-gene Gaussian noise with
    the class's standard deviation, clipped at zero."""
    metric = PseudoCellGenerationMetric()
    vocab = processor.feature_extractor.gene_vocab
    train_x = expression_matrix(train, len(vocab.gene_to_id))
    genes = np.flatnonzero(np.asarray((train_x != 0).sum(axis=0)).ravel())  # genes seen in training
    names = [vocab.id_to_gene[i] for i in genes]
    train_x, test_x = train_x[:, genes].toarray(), expression_matrix(test, len(vocab.gene_to_id))[:, genes].toarray()
    # Types with training cells: the baseline needs them (a type held out of training is judged by
    # `evaluate_zero_shot_holdout` instead).
    types = sorted(set(test["cell_type"]) & set(train["cell_type"]))
    tissue = {t: f" from {x}" if x else "" for t, x in zip(train["cell_type"], train["tissue"])}

    generator = _pipeline(TextToCellPipeline, model, processor)
    intended = [cell_type for cell_type in types for _ in range(cells_per_type)]
    prompts = generation_prompts(types, cells_per_type, tissue)
    # One call: the pipeline seeds each prompt's draw by its index, so no two generated cells share their noise
    # (a call per type gave cell k of every type the same draw, which pulled the types' cells together).
    generated = np.asarray(generator(prompts, n_cells=1, seed=seed, max_text_tokens=0, genes=names).X)

    rng = np.random.default_rng(seed)
    train_labels = np.asarray(train["cell_type"])
    baseline = np.concatenate(
        [
            np.clip(
                train_x[train_labels == t].mean(0)
                + rng.standard_normal((cells_per_type, len(genes))) * train_x[train_labels == t].std(0),
                0,
                None,
            )
            for t in types
        ]
    )

    def score(cells):
        # 5-NN trained on all real cells of both splits: more neighbours per type than the test split alone.
        return metric.compute(
            predictions=cells,
            references=intended,
            real_cells=np.concatenate([train_x, test_x]),
            real_labels=list(train_labels) + list(test["cell_type"]),
        )

    return {
        "model": score(generated),
        "baseline_class_mean_plus_noise": score(baseline),
        "n_genes": len(genes),
        "n_generated": len(generated),
    }


def evaluate_zero_shot_holdout(model, processor, test, holdout_types, batch_size: int = 16) -> dict:
    """Zero-shot annotation of test cells whose types were kept out of training: candidates are the Cell Ontology ids
    of every test type, seen or not, so a right answer means the model matched the cell to an unseen definition.

    Scored with the model's open-set reference where it has one (the pipeline's default) and without it
    (`*_without_open_set`), and, for what the open set costs, on the test cells of the trained types against the
    same candidates (`trained_types_accuracy*`)."""
    held_out = set(holdout_types)
    cells = test.filter(lambda r: r["cell_type"] in held_out)
    if len(cells) == 0:
        raise ValueError(f"No test cells of the held-out types {list(holdout_types)}; check the label spelling.")
    trained = test.filter(lambda r: r["cell_type"] not in held_out)
    column = _zero_shot_column(test)
    candidates = sorted(set(test[column]))
    annotator = _pipeline(CellTypeAnnotationPipeline, model, processor)
    metric = CellTypeAnnotationMetric()

    def score(split, open_set):
        ranked = annotator(
            split,
            candidate_labels=candidates,
            mode="zero-shot",
            open_set=open_set,
            batch_size=batch_size,
            progress=False,
        )
        return metric.compute(predictions=[r[0]["label"] for r in ranked], references=list(split[column]))

    result = score(cells, None)
    extra = {"accuracy_without_open_set": score(cells, False)["accuracy"]}
    if len(trained):
        extra["trained_types_accuracy"] = score(trained, None)["accuracy"]
        extra["trained_types_accuracy_without_open_set"] = score(trained, False)["accuracy"]
    return {
        "holdout_types": list(holdout_types),
        "n_cells": len(cells),
        "n_candidates": len(candidates),
        "chance_accuracy": 1 / len(candidates),
        "open_set": bool(getattr(model.config, "open_set_labels", None)),
        **result,
        **extra,
    }


def write_results(results: dict, path: str | os.PathLike) -> None:
    """JSON, written atomically, in the layout `hub.eval_results_from_json` reads for the model card."""
    atomic_write_text(path, json.dumps(results, indent=2, default=float))


PBMC_DATASET = {"name": "PBMC 68k reduced (scanpy)", "type": "pbmc68k_reduced", "split": "test"}


def _model_index(results: dict) -> dict[str, dict[str, float]]:
    """The model's own numbers per pipeline task, the `results` block `hub.eval_results_from_json` reads."""
    description = results["cell_description"]["model"]
    annotation = results["cell_type_annotation"]
    generation = results["pseudo_cell_generation"]["model"]
    return {
        "cell-description": {k: description[k] for k in ("bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "meteor")},
        "cell-type-annotation": {
            f"{k}_{mode}": annotation[f"model_{mode}"][k]
            for mode in ("zero-shot", "generative")
            if f"model_{mode}" in annotation
            for k in ("accuracy", "macro_f1")
        },
        "text-to-cell": {"knn_accuracy": generation["knn_accuracy"], "mmd": generation["mmd"]},
    }


@torch.no_grad()
def evaluate_paper_tasks(
    model,
    processor,
    train,
    test,
    description_cells: int | None = None,
    cells_per_type: int = 4,
    seed: int = 0,
    dataset: dict | None = None,
) -> dict:
    """Runs the three evaluations on `test`, with baselines fit on `train`. `description_cells` caps the cells
    described (text generation is the slow part). `dataset` (`name`, `type`, `split`) names the data for the
    model card; it defaults to the PBMC demo."""
    model.eval()
    described = test if description_cells is None else test.select(range(min(description_cells, len(test))))
    results = {
        "n_train_cells": len(train),
        "n_test_cells": len(test),
        "cell_description": evaluate_description(model, processor, train, described),
        "cell_type_annotation": evaluate_annotation(model, processor, train, test),
        "pseudo_cell_generation": evaluate_generation(model, processor, train, test, cells_per_type, seed),
    }
    results["dataset"] = dict(dataset or PBMC_DATASET)
    results["results"] = _model_index(results)
    return results


def format_table(results: dict) -> str:
    """One table: task, metric, model, baseline."""
    rows = [("task", "metric", "scMMGPT", "baseline")]
    desc = results["cell_description"]
    for key in ("bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "meteor"):
        rows.append(("description", key, desc["model"].get(key), desc["baseline_nearest_training_cell"].get(key)))
    annotation = results["cell_type_annotation"]
    base = annotation["baseline_logistic_regression"]
    for mode in ("zero-shot", "generative"):
        if f"model_{mode}" in annotation:
            for key in ("accuracy", "macro_f1"):
                rows.append((f"annotation ({mode})", key, annotation[f"model_{mode}"][key], base[key]))
    gen = results["pseudo_cell_generation"]
    for key in ("knn_accuracy", "mmd", "within_type_spread", "centroid_correlation"):
        rows.append(("generation", key, gen["model"].get(key), gen["baseline_class_mean_plus_noise"].get(key)))

    def cell(value):
        return "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))

    widths = [max(len(cell(r[i])) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell(v).ljust(w) for v, w in zip(row, widths)) for row in rows)


@dataclass
class ScMMGPTEvaluationArguments:
    """What `scmmgpt evaluate` scores; the cells come from [`ScMMGPTDataArguments`] (the PBMC demo by default)."""

    model: str | None = field(
        default=None,
        metadata={"help": "A saved scMMGPT folder. None: an untrained tiny model (a floor, not a result)."},
    )
    output_json: str | None = field(
        default=None, metadata={"help": "Write the results here (the model card reads it)."}
    )
    test_cells: int | None = field(
        default=None, metadata={"help": "Evaluate on a seeded sample of this many test cells."}
    )
    description_cells: int | None = field(default=None, metadata={"help": "Describe at most this many test cells."})
    cells_per_type: int = field(default=4, metadata={"help": "Pseudo-cells generated per cell type."})
    holdout_types: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Cell types kept out of the baselines' training cells; their test cells are also named "
            "zero-shot from Cell Ontology text."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the split, the test sample and generation."})

    def __post_init__(self):
        for name in ("test_cells", "description_cells", "cells_per_type"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}: need at least 1.")


def main(argv=None) -> dict:
    from transformers import HfArgumentParser

    from trainers.arguments import ScMMGPTDataArguments

    parser = HfArgumentParser(
        (ScMMGPTEvaluationArguments, ScMMGPTDataArguments),
        allow_abbrev=False,
        description="The paper's three evaluations on held-out cells, next to baselines.",
    )
    args, data_args = parser.parse_args_into_dataclasses(args=argv)
    return run_evaluation(args, data_args)


def run_evaluation(args: ScMMGPTEvaluationArguments, data_args) -> dict:
    """Loads the model and the cells, runs the three evaluations (and the held-out-type one), prints the table and
    writes the JSON. The baselines fit on the training cells; a model trained on the same `data_args` and seed has
    never seen the test cells."""
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    if args.model:
        model = ScMMGPTForConditionalGeneration.from_pretrained(args.model)
        processor = ScMMGPTProcessor.from_pretrained(args.model)
    else:
        print("No --model: evaluating an untrained tiny model (a floor, not a result).", file=sys.stderr)
        model, processor = build_model(load_pbmc(), tiny_lm=True)
    splits = load_cell_text_splits(data_args, processor.feature_extractor.gene_vocab, args.seed)
    if data_args.streaming:  # the baselines and metrics need the cells in memory
        splits = {
            name: datasets.Dataset.from_list(list(split), features=split.features) for name, split in splits.items()
        }
    if "test" not in splits:
        raise ValueError(
            "No test cells: pass test_data (with train_data and validation_data), or train_data alone to split it."
        )
    unknown = set(args.holdout_types) - set(splits["test"]["cell_type"])
    if unknown:
        raise ValueError(f"holdout_types {sorted(unknown)} are not cell types of the test cells; check the spelling.")
    train = splits["train"].filter(lambda r: r["cell_type"] not in set(args.holdout_types))
    test = splits["test"]
    if args.test_cells is not None:
        test = test.shuffle(seed=args.seed).select(range(min(args.test_cells, len(test))))
    dataset = (
        PBMC_DATASET
        if data_args.uses_demo_data
        else {
            "name": ", ".join(os.path.basename(p.rstrip("/")) for p in data_args.test_data or data_args.train_data),
            "type": "custom",
            "split": "test",
        }
    )
    results = evaluate_paper_tasks(
        model,
        processor,
        train,
        test,
        description_cells=args.description_cells,
        cells_per_type=args.cells_per_type,
        seed=args.seed,
        dataset=dataset,
    )
    if args.holdout_types:
        results["zero_shot_holdout"] = evaluate_zero_shot_holdout(model, processor, test, args.holdout_types)
    if args.output_json:
        write_results(results, args.output_json)
    where = "PBMC demo test split" if data_args.uses_demo_data else f"{dataset['name']} test cells"
    print(f"{where}: {results['n_test_cells']} cells; baselines fit on {results['n_train_cells']} training cells")
    print(format_table(results))
    return results


__all__ = [
    "ScMMGPTEvaluationArguments",
    "evaluate_paper_tasks",
    "evaluate_zero_shot_holdout",
    "expression_matrix",
    "format_table",
    "run_evaluation",
    "write_results",
]
