"""The paper's evaluation harness on the PBMC demo split, with a tiny untrained model: structure, baselines that
really learn, JSON that the model card reads, and the example script."""

import json

import numpy as np
import pytest
from conftest import tiny_demo

from scmmgpt.evaluation import evaluate_paper_tasks, evaluate_zero_shot_holdout, expression_matrix, format_table


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_demo(tmp_path_factory.mktemp("hf"))


def test_expression_matrix_matches_the_examples(setup):
    _, processor, splits = setup
    record = splits["test"][3]
    matrix = expression_matrix(splits["test"].select([3]), len(processor.feature_extractor.gene_vocab.gene_to_id))
    assert matrix.nnz == len(record["gene_ids"])
    np.testing.assert_allclose(matrix[0, record["gene_ids"]].toarray().ravel(), record["values"], rtol=1e-6)


def test_harness_reports_model_and_baselines(setup, tmp_path):
    from modeling_scmmgpt.hub import eval_results_from_json, render_model_card
    from scmmgpt.evaluation import write_results

    model, processor, splits = setup
    test = splits["test"].shuffle(seed=0).select(range(30))
    results = evaluate_paper_tasks(model, processor, splits["train"], test, description_cells=3, cells_per_type=1)
    annotation = results["cell_type_annotation"]
    n_types = len(set(splits["train"]["cell_type"]))
    # The baselines are real classifiers: far above chance on real PBMCs.
    assert annotation["baseline_logistic_regression"]["accuracy"] > 3 / n_types
    assert results["pseudo_cell_generation"]["baseline_class_mean_plus_noise"]["knn_accuracy"] > 3 / n_types
    assert results["cell_description"]["baseline_nearest_training_cell"]["rouge1"] > 0.3
    for mode in ("zero-shot", "generative"):
        assert 0 <= annotation[f"model_{mode}"]["accuracy"] <= 1
    assert len(results["cell_description"]["examples"]) == 3
    generated = results["cell_description"]["generated"]
    assert list(generated) == [str(i) for i in test["cell_id"][:3]]
    assert [e["generated"] for e in results["cell_description"]["examples"]] == list(generated.values())
    table = format_table(results)
    assert "annotation (zero-shot)" in table and "knn_accuracy" in table
    path = tmp_path / "metrics.json"
    write_results(results, path)
    entries = eval_results_from_json(str(path))
    assert {e.task_type for e in entries} == {"cell-description", "cell-type-annotation", "text-to-cell"}
    card = render_model_card(model, processor, eval_results=str(path))
    assert "model-index" in str(card)


def test_zero_shot_holdout_uses_every_test_type(setup):
    model, processor, splits = setup
    result = evaluate_zero_shot_holdout(model, processor, splits["test"], ["Dendritic"])
    assert result["n_candidates"] == len(set(splits["test"]["cell_type_ontology_term_id"]))
    assert result["n_cells"] == sum(t == "Dendritic" for t in splits["test"]["cell_type"])
    with pytest.raises(ValueError, match="No test cells"):
        evaluate_zero_shot_holdout(model, processor, splits["test"], ["Dendritic cells"])


def test_example_script_writes_json(setup, tmp_path, monkeypatch):
    import examples.evaluate_paper_tasks as script

    model, processor, _ = setup
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "metrics.json"
    script.main(
        [
            "--model",
            str(tmp_path / "model"),
            "--output-json",
            str(out),
            "--test-cells",
            "30",
            "--description-cells",
            "2",
            "--cells-per-type",
            "1",
            "--holdout-types",
            "Dendritic",
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["zero_shot_holdout"]["holdout_types"] == ["Dendritic"] and saved["n_test_cells"] == 30
    assert saved["n_train_cells"] < 489  # Dendritic cells were kept out of the training split


def test_annotated_test_cells_reuse_the_evaluation_descriptions(setup, monkeypatch):
    from conftest import pbmc_cells

    from modeling_scmmgpt import pipelines
    from scmmgpt.plots import annotate_test_cells

    model, processor, splits = setup
    small = {"train": splits["train"], "test": splits["test"].select(range(4))}
    ids = [str(i) for i in small["test"]["cell_id"]]
    generated = {i: f"text {n}" for n, i in enumerate(ids)}

    def no_generation(*args, **kwargs):
        raise AssertionError("descriptions were generated again")

    with monkeypatch.context() as patch:
        patch.setattr(pipelines.CellDescriptionPipeline, "__call__", no_generation)
        cells = annotate_test_cells(model, processor, pbmc_cells(), small, descriptions=generated)
    assert list(cells.obs["scmmgpt_description"]) == [generated[i] for i in ids]
    partial = dict(list(generated.items())[:2])  # not every test cell: generated afresh
    cells = annotate_test_cells(model, processor, pbmc_cells(), small, descriptions=partial)
    assert all(isinstance(t, str) for t in cells.obs["scmmgpt_description"])
    assert list(cells.obs["scmmgpt_description"])[:2] != list(partial.values())


def test_generated_cells_of_different_types_never_share_a_draw(setup, monkeypatch):
    """Cell k of each type is drawn with its own seed: at a temperature where the sampled deviation swamps the
    decoded mean, two cells generated for different types are unrelated. (A call per type gave cell k of every type
    the same draw: their profiles then correlated almost perfectly, which pulled the types' cells together.)"""
    import torch
    from conftest import pbmc_cells

    import scmmgpt.evaluation as evaluation
    from trainers.default_model import build_model

    _, processor, splits = setup
    torch.manual_seed(0)
    model, _ = build_model(pbmc_cells(), tiny_lm=True, expression_variance=True, gene_expression_variance=True)
    model.config.expression_temperature = 1000.0
    scored = []
    compute = evaluation.PseudoCellGenerationMetric.compute

    def recording_compute(self, **kwargs):
        """Records what is scored (`evaluate` appends to this docstring)."""
        scored.append(kwargs)
        return compute(self, **kwargs)

    monkeypatch.setattr(evaluation.PseudoCellGenerationMetric, "compute", recording_compute)
    evaluation.evaluate_generation(model.eval(), processor, splits["train"], splits["test"], cells_per_type=2)
    cells, intended = np.asarray(scored[0]["predictions"]), np.asarray(scored[0]["references"])
    first = cells[::2]  # cell 0 of each type
    assert len(set(intended[::2])) == len(first) > 2
    correlation = np.corrcoef(first)[np.triu_indices(len(first), k=1)]
    assert np.abs(correlation).max() < 0.5
