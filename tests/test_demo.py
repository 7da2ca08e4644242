from modeling_scmmgpt.demo import build_model, run_tasks


def test_demo_runs_three_tasks_on_real_pbmc(pbmc):
    model, processor = build_model(pbmc, tiny_lm=True)
    results = run_tasks(model, processor, pbmc, cells_per_type=2)
    assert results["n_cells"] == 20 and results["n_types"] == 10
    assert len(results["descriptions"]) == 3
    for key in ("annotation_accuracy", "annotation_macro_f1", "generation_knn_accuracy"):
        assert 0.0 <= results[key] <= 1.0
