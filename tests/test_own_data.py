"""Training and evaluating on the user's own data, from the user's own parts: PBMC cells rewritten as a lab would
hold them (renamed obs columns, versioned Ensembl IDs in a var column, donors), `.h5ad` files and a TileDB-SOMA
experiment, through `scmmgpt init`, `train --stage all` and `evaluate`."""

import csv
import gzip
import json
import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from modeling_scmmgpt.resources import gencode_human_path
from scmmgpt.cli import main
from trainers.arguments import ScMMGPTDataArguments, ScMMGPTModelDataArguments
from trainers.common import load_model_and_data
from trainers.data import expand_sources, load_cell_text_splits


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPES = ["CD14+ Monocyte", "CD19+ B", "CD56+ NK", "CD8+ Cytotoxic T", "CD4+/CD45RO+ Memory"]


@pytest.fixture(scope="module")
def lab_files(pbmc, tmp_path_factory):
    """Two `.h5ad` files (70% / 30% of five PBMC types): `celltype` and `organ` obs columns, six donors, var names
    that are not genes, and versioned Ensembl IDs in `var['ensembl']`."""
    with gzip.open(gencode_human_path(), "rt") as f:
        symbol_to_ensembl = {row[1]: row[0] for row in csv.reader(f)}
    raw = pbmc.raw.to_adata()
    genes = [g for g in raw.var_names if g in symbol_to_ensembl]
    cells = raw[pbmc.obs["bulk_labels"].isin(TYPES).to_numpy(), genes].copy()
    rng = np.random.default_rng(0)
    cells.obs = pd.DataFrame(
        {
            "celltype": pbmc.obs["bulk_labels"][cells.obs_names].astype(str).to_numpy(),
            "organ": "blood",
            "donor": [f"donor{d}" for d in rng.integers(0, 6, cells.n_obs)],
        },
        index=cells.obs_names,
    )
    cells.var = pd.DataFrame(
        {"ensembl": [symbol_to_ensembl[g] + ".7" for g in genes]}, index=[f"feature_{i}" for i in range(len(genes))]
    )
    order = rng.permutation(cells.n_obs)
    cut = int(0.7 * cells.n_obs)
    directory = tmp_path_factory.mktemp("lab")
    paths = {}
    for name, rows in (("train", order[:cut]), ("heldout", order[cut:])):
        paths[name] = str(directory / f"{name}.h5ad")
        cells[np.sort(rows)].copy().write_h5ad(paths[name])
    paths["adata"] = cells
    return paths


def _data_args(**kwargs):
    kwargs.setdefault("label_column", "celltype")
    kwargs.setdefault("gene_column", "ensembl")
    return ScMMGPTDataArguments(**kwargs)


def test_own_h5ad_split_by_donor_keeps_donors_apart(lab_files, pbmc_vocab, tmp_path):
    args = _data_args(
        train_data=[lab_files["train"]], donor_column="donor", tissue_column="organ", data_cache_dir=str(tmp_path)
    )
    splits = load_cell_text_splits(args, pbmc_vocab, seed=0)
    obs = ad.read_h5ad(lab_files["train"], backed="r").obs
    donors = {name: set(obs.loc[list(split["cell_id"]), "donor"]) for name, split in splits.items()}
    assert all(donors.values())
    assert not (donors["train"] & donors["validation"]) and not (donors["train"] & donors["test"])
    assert not (donors["validation"] & donors["test"])
    assert sum(len(s) for s in splits.values()) == len(obs)  # every cell has expressed vocabulary genes here
    assert set(splits["train"]["tissue"]) == {"blood"}  # the organ column became the tissue text
    assert len(splits["train"]) > len(splits["test"])
    record = splits["train"][0]
    assert record["cell_type"] in TYPES and len(record["gene_ids"]) > 10  # Ensembl IDs resolved to the vocabulary


def test_obs_filter_selects_exactly_the_matching_cells(lab_files, pbmc_vocab, tmp_path):
    query = "celltype in ['CD19+ B', 'CD56+ NK'] and donor != 'donor0'"
    args = _data_args(train_data=[lab_files["train"]], obs_filter=query, data_cache_dir=str(tmp_path))
    splits = load_cell_text_splits(args, pbmc_vocab, seed=0)
    expected = ad.read_h5ad(lab_files["train"], backed="r").obs.query(query)
    got = [cell for split in splits.values() for cell in split["cell_id"]]
    assert sorted(got) == sorted(expected.index)
    with pytest.raises(ValueError, match="selects no cells"):
        load_cell_text_splits(
            _data_args(
                train_data=[lab_files["train"]], obs_filter="celltype == 'neuron'", data_cache_dir=str(tmp_path)
            ),
            pbmc_vocab,
        )
    with pytest.raises(ValueError, match="obs_filter .* does not evaluate on obs.*celltype"):
        load_cell_text_splits(
            _data_args(train_data=[lab_files["train"]], obs_filter="cell_kind == 'B'", data_cache_dir=str(tmp_path)),
            pbmc_vocab,
        )


def test_bad_data_is_one_clear_error_before_training(lab_files, pbmc_vocab, tmp_path):
    cache = str(tmp_path)
    with pytest.raises(KeyError, match="no 'cell_kind' column"):
        load_cell_text_splits(
            _data_args(train_data=[lab_files["train"]], label_column="cell_kind", data_cache_dir=cache), pbmc_vocab
        )
    with pytest.raises(ValueError, match="are not in the vocabulary"):  # var_names are feature_0, ...: no overlap
        load_cell_text_splits(
            _data_args(train_data=[lab_files["train"]], gene_column=None, data_cache_dir=cache), pbmc_vocab
        )
    no_labels = lab_files["adata"][:40].copy()
    no_labels.obs["celltype"] = np.nan
    path = str(tmp_path / "nolabels.h5ad")
    no_labels.write_h5ad(path)
    with pytest.raises(ValueError, match="holds no labels"):
        load_cell_text_splits(_data_args(train_data=[path], data_cache_dir=cache), pbmc_vocab)
    with pytest.raises(ValueError, match="has 1 distinct value"):
        load_cell_text_splits(
            _data_args(train_data=[lab_files["train"]], donor_column="organ", data_cache_dir=cache), pbmc_vocab
        )
    with pytest.raises(FileNotFoundError, match="no file matches"):
        expand_sources([str(tmp_path / "missing_*.h5ad")])
    with pytest.raises(ValueError, match="use_raw and layer"):
        _data_args(train_data=[path], use_raw=True, layer="counts")
    with pytest.raises(ValueError, match="split_fractions"):
        _data_args(train_data=[path], split_fractions=[0.5, 0.5])


def test_globs_and_files_per_split(lab_files, pbmc_vocab, tmp_path):
    folder = os.path.dirname(lab_files["train"])
    assert expand_sources([os.path.join(folder, "*.h5ad")]) == sorted([lab_files["heldout"], lab_files["train"]])
    args = _data_args(
        train_data=[lab_files["train"]],
        validation_data=[lab_files["heldout"]],
        test_data=[os.path.join(folder, "held*.h5ad")],
        data_cache_dir=str(tmp_path),
    )
    splits = load_cell_text_splits(args, pbmc_vocab)
    assert set(splits) == {"train", "validation", "test"}
    assert list(splits["test"]["cell_id"]) == list(ad.read_h5ad(lab_files["heldout"], backed="r").obs_names)
    streamed = load_cell_text_splits(ScMMGPTDataArguments(**{**vars(args), "streaming": True}), pbmc_vocab)
    assert [r["cell_id"] for r in streamed["test"]] == list(splits["test"]["cell_id"])


def _to_soma(h5ad: str, uri: str):
    import tiledbsoma.io

    adata = ad.read_h5ad(h5ad)
    adata.var["feature_name"] = adata.var["ensembl"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiledbsoma.io.from_anndata(uri, adata, measurement_name="RNA", X_layer_name="data")
    return adata


def test_soma_experiment_with_a_value_filter(lab_files, pbmc_vocab, tmp_path):
    soma = str(tmp_path / "soma")
    adata = _to_soma(lab_files["train"], soma)
    query = "celltype in ['CD14+ Monocyte', 'CD56+ NK']"
    args = ScMMGPTDataArguments(
        train_data=[soma],
        obs_filter=query,
        label_column="celltype",
        layer="data",
        data_cache_dir=str(tmp_path / "cache"),
    )
    splits = load_cell_text_splits(args, pbmc_vocab, seed=0)
    expected = adata.obs.query(query)
    assert sum(len(s) for s in splits.values()) == len(expected)
    assert sorted(c for s in splits.values() for c in s["cell_id"]) == sorted(expected.index)
    # The same cells through the h5ad path, value for value.
    h5ad = load_cell_text_splits(
        _data_args(train_data=[lab_files["train"]], obs_filter=query, data_cache_dir=str(tmp_path / "cache_h5ad")),
        pbmc_vocab,
        seed=0,
    )
    for split in ("train", "test"):
        assert [r.pop("source") and r for r in h5ad[split]] == [r.pop("source") and r for r in splits[split]]


def _tiny_parts(tmp_path, pbmc_vocab):
    """A random tiny cell encoder folder and a tiny LM folder with its own word tokenizer, as a user's parts."""
    import torch
    from tester import tiny_cell_config
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_scmmgpt import ScMMGPTCellModel, ScMMGPTCellProcessor
    from modeling_scmmgpt.prompts import ANNOTATE, DESCRIBE, GENERATE
    from trainers.default_model import train_word_tokenizer

    torch.manual_seed(0)
    encoder = tmp_path / "encoder"
    config = tiny_cell_config(pbmc_vocab, d_model=32, d_hid=64, max_genes=128)
    ScMMGPTCellModel(config).save_pretrained(encoder)
    ScMMGPTCellProcessor(pbmc_vocab, max_genes=128).save_pretrained(encoder)
    words = [
        *TYPES,
        *DESCRIBE,
        *ANNOTATE,
        *(g.format(cell_type=t, tissue=" from blood") for g in GENERATE for t in TYPES),
        "cell type: CD14-positive monocyte B cell natural killer cell CD8-positive, alpha-beta cytotoxic T cell "
        "CD4-positive, alpha-beta memory T cell tissue: blood. disease: normal.",
    ]
    tokenizer = train_word_tokenizer(words)
    lm = tmp_path / "lm"
    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).save_pretrained(lm)
    tokenizer.save_pretrained(lm)
    return str(encoder), str(lm)


TINY_STEPS = [
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "4",
    "--max_eval_samples",
    "8",
    "--eval_strategy",
    "no",
    "--save_strategy",
    "no",
]


def _train_all_stages(runs: str, model: str, *argv: str) -> int:
    """`scmmgpt train --stage all` with the example configs, from `model`, at the tests' tiny step counts."""
    configs = os.path.join(ROOT, "examples/configs")
    return main(
        ["train", "--stage", "all", "--output-dir", runs, configs, "--model_name_or_path", model, *argv, *TINY_STEPS]
    )


def _evaluate_trained(runs: str, train: str, test: str, *argv: str, describe: int, per_type: int, output) -> int:
    """`scmmgpt evaluate` of the instruction stage in `runs`, fitting the baselines on `train`, testing on `test`."""
    model = os.path.join(runs, "instruction")
    sizes = ["--description_cells", str(describe), "--cells_per_type", str(per_type), "--output_json", str(output)]
    return main(["evaluate", "--model", model, "--train_data", train, "--test_data", test, *argv, *sizes])


def _init_tiny_model(tmp_path, pbmc_vocab) -> str:
    """`scmmgpt init` from the tiny parts, with a small random Q-Former; returns the model folder."""
    encoder, lm = _tiny_parts(tmp_path, pbmc_vocab)
    model = str(tmp_path / "model")
    qformer = json.dumps(
        {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    )
    assert (
        main(
            [
                "init",
                "--cell-encoder",
                encoder,
                "--language-model",
                lm,
                "--num-cell-tokens",
                "4",
                "--option",
                f"qformer_config={qformer}",
                "--option",
                "cell_summary=true",
                "--output-dir",
                model,
            ]
        )
        == 0
    )
    return model


def test_init_train_all_and_evaluate_on_own_files(lab_files, pbmc_vocab, tmp_path, capsys):
    model = _init_tiny_model(tmp_path, pbmc_vocab)
    encoder, lm = str(tmp_path / "encoder"), str(tmp_path / "lm")
    assert os.path.isfile(os.path.join(model, "model.safetensors")) and os.path.isfile(
        os.path.join(model, "config.json")
    )
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".init-")]  # no staging folder left
    assert main(["init", "--cell-encoder", encoder, "--language-model", lm, "--output-dir", model]) == 2  # exists

    columns = ["--label_column", "celltype", "--gene_column", "ensembl", "--data_cache_dir", str(tmp_path / "cache")]
    train, heldout = lab_files["train"], lab_files["heldout"]
    data = ["--train_data", train, *columns, "--donor_column", "donor"]
    runs = str(tmp_path / "runs")
    assert _train_all_stages(runs, model, *data) == 0
    for stage in ("contrastive", "reconstruction", "instruction"):
        assert os.path.isfile(os.path.join(runs, stage, "stage_complete.json"))

    metrics = tmp_path / "metrics.json"
    capsys.readouterr()
    assert _evaluate_trained(runs, train, heldout, *columns, describe=4, per_type=2, output=metrics) == 0
    printed = capsys.readouterr().out
    assert "heldout.h5ad test cells" in printed and "baseline" in printed
    results = json.loads(metrics.read_text())
    assert results["n_test_cells"] == ad.read_h5ad(lab_files["heldout"], backed="r").n_obs
    assert results["dataset"]["name"] == "heldout.h5ad"
    annotation = results["cell_type_annotation"]
    assert {"model_zero-shot", "model_generative", "baseline_logistic_regression"} <= set(annotation)
    assert annotation["baseline_logistic_regression"]["accuracy"] > 0.5  # the baseline reads these cells well


def test_init_train_all_and_evaluate_on_filtered_soma_experiments(lab_files, pbmc_vocab, tmp_path, capsys):
    """The same run on two SOMA experiments (training and held-out cells) with a value filter: every cell the filter
    selects in the training experiment is trained on, and the evaluation's baselines fit on exactly those cells."""
    train_soma, test_soma = str(tmp_path / "train_soma"), str(tmp_path / "test_soma")
    train_cells = _to_soma(lab_files["train"], train_soma)
    _to_soma(lab_files["heldout"], test_soma)
    query = "celltype != 'CD19+ B' and donor != 'donor5'"
    data = [
        "--label_column",
        "celltype",
        "--layer",
        "data",
        "--obs_filter",
        query,
        "--data_cache_dir",
        str(tmp_path / "cache"),
    ]
    model = _init_tiny_model(tmp_path, pbmc_vocab)
    _, _, splits = load_model_and_data(
        ScMMGPTModelDataArguments(
            train_data=[train_soma],
            validation_data=[test_soma],
            obs_filter=query,
            label_column="celltype",
            layer="data",
            data_cache_dir=str(tmp_path / "cache"),
            model_name_or_path=model,
        ),
        seed=0,
    )
    assert len(splits["train"]) == len(train_cells.obs.query(query))  # all of the filter's cells, none other
    runs = str(tmp_path / "runs")
    assert _train_all_stages(runs, model, "--train_data", train_soma, "--validation_data", test_soma, *data) == 0
    metrics = tmp_path / "metrics.json"
    assert _evaluate_trained(runs, train_soma, test_soma, *data, describe=2, per_type=1, output=metrics) == 0
    results = json.loads(metrics.read_text())
    assert results["n_train_cells"] == len(train_cells.obs.query(query))
    assert results["n_test_cells"] == len(ad.read_h5ad(lab_files["heldout"], backed="r").obs.query(query))


def test_every_evaluation_option_changes_the_result(lab_files, tmp_path):
    """`scmmgpt evaluate`'s options each change what is measured (an untrained model: the numbers are a floor)."""
    from scmmgpt.evaluation import ScMMGPTEvaluationArguments, run_evaluation

    data = ScMMGPTDataArguments(
        train_data=[lab_files["train"]],
        test_data=[lab_files["heldout"]],
        label_column="celltype",
        gene_column="ensembl",
        data_cache_dir=str(tmp_path),
    )

    def run(**options):
        options.setdefault("description_cells", 2)
        options.setdefault("cells_per_type", 1)
        options.setdefault("test_cells", 30)
        return run_evaluation(ScMMGPTEvaluationArguments(**options), data)

    base = run()
    assert base["n_test_cells"] == 30 and len(base["cell_description"]["generated"]) == 2
    assert run(test_cells=20)["n_test_cells"] == 20
    assert len(run(description_cells=3)["cell_description"]["generated"]) == 3
    assert (
        run(cells_per_type=2)["pseudo_cell_generation"]["n_generated"]
        == 2 * base["pseudo_cell_generation"]["n_generated"]
    )
    held = run(holdout_types=["CD19+ B"])
    assert held["n_train_cells"] < base["n_train_cells"] and held["zero_shot_holdout"]["holdout_types"] == ["CD19+ B"]
    other_seed = run(seed=1)
    assert other_seed["cell_description"]["generated"] != base["cell_description"]["generated"]  # another test sample
    with pytest.raises(ValueError, match="not cell types of the test cells"):
        run(holdout_types=["neuron"])


def test_paper_configs_dry_run_resolves_the_census_plan(tmp_path, capsys):
    """The paper-scale configs name a real data source; --dry-run prints the plan without loading or reading."""
    out = str(tmp_path / "paper")
    assert (
        main(
            [
                "train",
                "--stage",
                "all",
                "--suffix",
                "paper",
                "--dry-run",
                "--output-dir",
                out,
                os.path.join(ROOT, "examples/configs"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.count("census/2025-01-30/soma/census_data/homo_sapiens") == 3
    assert "is_primary_data == True" in printed and '"donor": "donor_id"' in printed and "streaming: True" in printed
    assert f"model: {os.path.join(out, 'contrastive')}" in printed  # stage 2 starts from stage 1
    assert "model: runs/paper/init" in printed and "precision: bf16" in printed
    assert not os.path.exists(out)  # nothing written


def test_streamed_training_data_keeps_limits_and_a_seeded_shuffle(lab_files, tmp_path):
    """With streaming, the training split is a seeded buffered shuffle of the stream, max_train_samples and
    max_eval_samples take that many cells, and the same seed gives the same order."""
    import datasets

    def train_ids(seed, **options):
        args = ScMMGPTModelDataArguments(
            train_data=[lab_files["train"]],
            label_column="celltype",
            gene_column="ensembl",
            streaming=True,
            shuffle_buffer_size=64,
            data_cache_dir=str(tmp_path),
            **options,
        )
        _, _, data = load_model_and_data(args, seed)
        assert isinstance(data["train"], datasets.IterableDataset)
        return [r["cell_id"] for r in data["train"]], [r["cell_id"] for r in data["validation"]]

    first, _ = train_ids(0)
    again, _ = train_ids(0)
    other, _ = train_ids(1, gene_embedding_init="random")  # another split and order; no PCA to read
    assert first == again and first != other
    limited, validation = train_ids(0, max_train_samples=10, max_eval_samples=5)
    assert limited == first[:10] and len(validation) == 5
