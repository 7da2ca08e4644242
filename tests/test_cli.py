"""The `scmmgpt` command: `demo --fast` writes every artefact, the pipeline subcommands read and write files, and
bad input gives a one-line error with a hint (no traceback)."""

import json
import math
import os
import re
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

from scmmgpt.cli import EXAMPLES, _load, main


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cells_h5ad(tmp_path_factory, pbmc):
    path = tmp_path_factory.mktemp("cells") / "cells.h5ad"
    pbmc[:12].copy().write_h5ad(path)  # the demo model reads .raw (log-normalised)
    return str(path)


def test_demo_fast_writes_every_artefact(demo_dir):
    from PIL import Image

    model = demo_dir / "instruction"
    assert (model / "model.safetensors").exists() and (model / "README.md").exists()
    assert "model-index" in (model / "README.md").read_text()
    annotated = ad.read_h5ad(demo_dir / "pbmc_test_annotated.h5ad")
    assert annotated.obsm["X_scmmgpt"].shape[0] == annotated.n_obs > 50
    for column in ("true_cell_type", "scmmgpt_cell_type", "scmmgpt_description"):
        assert column in annotated.obs
    for name, size in (("umap_cell_embeddings.png", (1430, 605)), ("generated_vs_real.png", (1650, 660))):
        image = Image.open(demo_dir / name)
        assert image.size == size and np.asarray(image).std() > 10  # not blank
    metrics = (demo_dir / "metrics.json").read_text()
    assert "cell_type_annotation" in metrics and "machine" in metrics


def test_demo_fast_model_knows_its_cells(demo_dir):
    """Issue 12: the fast demo's model must learn cells. Zero-shot annotation of the test split must reach at least
    twice the majority-type share, which a model that names one type for every cell (the collapse this guards
    against) cannot pass."""
    import json
    from collections import Counter

    from modeling_scmmgpt import ScMMGPTProcessor
    from trainers.data import load_pbmc_demo

    results = json.loads((demo_dir / "metrics.json").read_text())
    processor = ScMMGPTProcessor.from_pretrained(demo_dir / "instruction")
    test = load_pbmc_demo(gene_vocab=processor.feature_extractor.gene_vocab, cache_dir=str(demo_dir / "hf_cache"))[
        "test"
    ]
    assert len(test) == results["n_test_cells"]
    majority_share = Counter(test["cell_type"]).most_common(1)[0][1] / len(test)
    accuracy = results["cell_type_annotation"]["model_zero-shot"]["accuracy"]
    assert accuracy >= 2 * majority_share, (accuracy, majority_share)


def test_demo_fast_model_keeps_its_open_set_reference(demo_dir):
    """The contrastive stage fits the open-set reference on its training cells (`trainers.open_set`), so the final
    model knows the demo's ten types (labels and Cell Ontology ids) and holds all 489 training cells' features."""
    import json

    from trainers.data.builders import PBMC_LABEL_TO_CELL_ONTOLOGY
    from trainers.run import COMPLETE

    config = json.loads((demo_dir / "instruction" / "config.json").read_text())
    expected = set(PBMC_LABEL_TO_CELL_ONTOLOGY) | set(PBMC_LABEL_TO_CELL_ONTOLOGY.values())
    assert set(config["open_set_labels"]) == expected
    assert config["open_set_reference_size"] == 489 and -1 < config["open_set_threshold"] < 1
    fitted = {
        s: json.loads((demo_dir / s / COMPLETE).read_text())["open_set"]
        for s in ("contrastive", "reconstruction", "instruction")
    }
    # Stage 1 aligns cells and texts; stages 2 and 3 keep the cell path frozen, so they keep its reference.
    assert fitted["contrastive"]["open_set_reference_cells"] == 489
    assert "kept" in fitted["reconstruction"] and "kept" in fitted["instruction"]


def test_annotate_names_new_types_for_unfamiliar_cells_unless_told_not_to(demo_dir, cells_h5ad, tmp_path):
    """`annotate` follows the model's open-set reference: with a threshold every cell falls below, each cell is named
    among the candidates the model never trained on; `--no-open-set` ranks all candidates as before."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(demo_dir / "instruction", model)
    config = json.loads((model / "config.json").read_text())
    config["open_set_threshold"] = 2.0  # above any cosine similarity: every cell is unlike the training cells
    (model / "config.json").write_text(json.dumps(config))
    new = "hepatocyte"  # not a demo type, nor like one
    argv = ["annotate", "--model", str(model), "--input", cells_h5ad, "--labels", "CL:0000236", "CL:0001054", new]
    labels = {}
    for flag in ([], ["--no-open-set"]):
        out = tmp_path / f"a{len(flag)}.csv"
        assert main([*argv, "--output", str(out), *flag]) == 0
        labels[bool(flag)] = [row.split(",")[1] for row in out.read_text().splitlines()[1:]]
    assert labels[False] == [new] * 12
    assert set(labels[True]) != {new}


def test_architecture_figure_matches_the_readme(tmp_path):
    from PIL import Image

    from scmmgpt.plots import plot_architecture

    plot_architecture(str(tmp_path / "architecture.png"))
    drawn, committed = (
        Image.open(p) for p in (tmp_path / "architecture.png", os.path.join(ROOT, "docs", "architecture.png"))
    )
    assert drawn.size == committed.size == (1705, 462) and np.asarray(drawn).std() > 10
    assert "docs/architecture.png" in open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_demo_rerun_reuses_finished_work(demo_dir, capsys):
    stamp = os.path.getmtime(demo_dir / "instruction" / "model.safetensors")
    assert main(["demo", "--fast", "--output-dir", str(demo_dir)]) == 0
    assert os.path.getmtime(demo_dir / "instruction" / "model.safetensors") == stamp


def test_pipeline_subcommands_write_files(demo_dir, cells_h5ad, pbmc, tmp_path, monkeypatch, capsys):
    model = str(demo_dir / "instruction")

    def run(command, output, *options, cells=cells_h5ad):
        """`scmmgpt COMMAND --model M --input CELLS --output tmp/OUTPUT OPTIONS...`, in process."""
        return main([command, "--model", model, "--input", cells, "--output", str(tmp_path / output), *options])

    assert run("embed", "e.h5ad") == 0
    assert ad.read_h5ad(tmp_path / "e.h5ad").obsm["X_scmmgpt"].shape[0] == 12
    assert run("embed", "e.npy") == 0
    assert np.load(tmp_path / "e.npy").shape[0] == 12
    monkeypatch.setenv("SCMMGPT_CACHE_DIR", str(tmp_path / "cache"))
    assert run("embed", "f.npy", "--fast") == 0 and "fast mode: linear" in capsys.readouterr().err
    # The fast mode measures at the input cells' median length (rounded up to 64), not at the processor's max_genes:
    # cells that express few genes get a measurement of their own.
    short = pbmc[:12].raw.to_adata()[:, :150].copy()
    short.raw = short
    short.write_h5ad(tmp_path / "short.h5ad")
    assert run("embed", "s.npy", "--fast", cells=str(tmp_path / "short.h5ad")) == 0
    keys = json.loads((tmp_path / "cache" / "fast_mode.json").read_text())
    measured_at = {int(re.search(r"genes=(\d+)", key).group(1)) for key in keys}
    _, processor = _load(model)
    median = float(processor.feature_extractor(short)["cell_attention_mask"].sum(1).float().median())
    expected = math.ceil(median / 64) * 64
    assert len(measured_at) == 2 and expected in measured_at and expected < processor.feature_extractor.max_genes
    assert float((np.load(tmp_path / "f.npy") * np.load(tmp_path / "e.npy")).sum(1).min()) > 0.99
    labels = ["--labels", "CL:0000236", "natural killer cell", "CD14-positive monocyte"]
    assert run("annotate", "a.csv", *labels, "--top-k", "2") == 0
    table = (tmp_path / "a.csv").read_text().splitlines()
    assert len(table) == 13 and "scmmgpt_cell_type_2" in table[0]
    # more than the labels: cut to 2, with a warning
    assert run("annotate", "a3.csv", "--labels", "B cell", "T cell", "--top-k", "5") == 0
    assert "scmmgpt_cell_type_2" in (tmp_path / "a3.csv").read_text().splitlines()[0]
    assert run("annotate", "a0.csv", "--labels", "B cell", "--top-k", "0") == 2 and not (tmp_path / "a0.csv").exists()
    assert run("describe", "d.csv", "--max-new-tokens", "4") == 0
    assert len((tmp_path / "d.csv").read_text().splitlines()) >= 13
    generate = ["generate", "--model", model, "--prompt", "a B cell from blood", "--n-cells", "2"]
    assert main([*generate, "--output", str(tmp_path / "g.h5ad")]) == 0
    assert ad.read_h5ad(tmp_path / "g.h5ad").n_obs == 2


def _run(*args):
    return subprocess.run([sys.executable, "-m", "scmmgpt.cli", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_every_subcommand_has_help_with_an_example(command, capsys):
    # In process: a subprocess per subcommand cost about 12 s each (the imports); the console entry point itself
    # is run as a subprocess below (test_errors_are_one_line_with_a_hint) and for `embed --help` here.
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "example:" in out and f"scmmgpt {command}" in out
    if command == "evaluate":  # its dataclass options, built only when the command is named
        assert "--test_cells" in out and "--train_data" in out


def test_help_through_the_entry_point():
    result = _run("embed", "--help")
    assert result.returncode == 0 and "example:" in result.stdout and "scmmgpt embed" in result.stdout


def test_help_starts_without_the_training_stack():
    """`scmmgpt --help` and another command's help build no dataclass options, so they import neither transformers
    nor torch (about 10 s); `evaluate --help` still lists its dataclass options."""
    code = (
        "import sys\nfrom scmmgpt.cli import main\n"
        "for argv in (['--help'], ['embed', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('IMPORTED', sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "IMPORTED []" in result.stdout, result.stdout[-300:] + result.stderr[-300:]
    assert "evaluate" in result.stdout and "scmmgpt embed" in result.stdout


def test_errors_are_one_line_with_a_hint(demo_dir, cells_h5ad, tmp_path, pbmc):
    unknown = _run("frobnicate")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert unknown.stderr.splitlines()[0].startswith("scmmgpt: error:") and "hint:" in unknown.stderr

    missing = _run("embed", "--model", str(demo_dir / "instruction"), "--input", "nope.h5ad", "--output", "x.h5ad")
    assert (
        missing.returncode == 2 and "nope.h5ad: no such file" in missing.stderr and "Traceback" not in missing.stderr
    )

    ensembl = pbmc[:4].copy()
    raw = ensembl.raw.to_adata()
    raw.var_names = [f"ENSG{i:011d}" for i in range(raw.n_vars)]
    ensembl.raw = raw
    ensembl.write_h5ad(tmp_path / "ensembl.h5ad")
    wrong_ids = _run(
        "embed",
        "--model",
        str(demo_dir / "instruction"),
        "--input",
        str(tmp_path / "ensembl.h5ad"),
        "--output",
        str(tmp_path / "x.h5ad"),
    )
    error, hint = wrong_ids.stderr.strip().splitlines()[-2:]  # after any progress bar
    assert wrong_ids.returncode == 2 and "Traceback" not in wrong_ids.stderr
    assert error.startswith("scmmgpt embed: error:") and "measures 0 of the model's 705 genes" in error
    assert hint.startswith("hint:") and "--gene-id-column" in hint

    debug = _run("--debug", "embed", "--model", str(demo_dir / "instruction"), "--input", "nope.h5ad", "--output", "x")
    assert "Traceback" in debug.stderr


def test_train_subcommand_runs_a_stage_from_a_config(tmp_path):
    config = os.path.join(ROOT, "examples", "configs", "reconstruction_tiny.yaml")
    out = tmp_path / "stage"
    assert (
        main(
            [
                "train",
                "--stage",
                "reconstruction",
                config,
                "--max_steps",
                "2",
                "--output_dir",
                str(out),
                "--max_train_samples",
                "16",
                "--max_eval_samples",
                "8",
                "--save_strategy",
                "no",
                "--data_cache_dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    assert (out / "model.safetensors").exists() and (out / "stage_complete.json").exists()
    configs, chained = os.path.join(ROOT, "examples", "configs"), tmp_path / "all"
    assert (
        main(
            [
                "train",
                "--stage",
                "all",
                "--output-dir",
                str(chained),
                configs,
                "--max_steps",
                "1",
                "--max_train_samples",
                "8",
                "--max_eval_samples",
                "4",
                "--save_strategy",
                "no",
                "--data_cache_dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    for stage in ("contrastive", "reconstruction", "instruction"):
        assert (chained / stage / "stage_complete.json").exists()
    assert not (chained / "instruction" / "adapter").exists()  # the tiny config trains without LoRA: no adapters
    assert main(["train", "--stage", "all", configs]) == 2  # no --output-dir
    assert main(["train", "--stage", "all", "--output-dir", str(chained), config]) == 2  # a file, not the folder
    assert main(["train", "--stage", "pretraining", config]) == 2
    assert main(["train", "--stage", "reconstruction", str(tmp_path / "missing.yaml")]) == 2


def test_evaluate_subcommand_writes_metrics(demo_dir, tmp_path):
    out = tmp_path / "metrics.json"
    assert (
        main(["evaluate", "--model", str(demo_dir / "instruction"), "--output-json", str(out), "--test-cells", "12"])
        == 0
    )
    assert "cell_description" in out.read_text()


def test_convert_scgpt_subcommand(tmp_path, pbmc, capsys):
    from scgpt_reference import flash_layout, random_scgpt

    vocab = {g: i for i, g in enumerate(pbmc.raw.var_names)}
    vocab.update({"<pad>": len(vocab), "<cls>": len(vocab) + 1, "<eoc>": len(vocab) + 2})
    import json

    import torch

    torch.save(flash_layout(random_scgpt(16, 2, 1, 16, vocab, 0).state_dict()), tmp_path / "best_model.pt")
    (tmp_path / "args.json").write_text(
        json.dumps({"embsize": 16, "nheads": 2, "nlayers": 1, "d_hid": 16, "pad_token": "<pad>", "n_bins": 51})
    )
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    assert main(["convert-scgpt", str(tmp_path), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert main(["convert-scgpt", str(tmp_path / "nowhere"), str(tmp_path / "out2")]) == 2
    assert "no such scGPT checkpoint" in capsys.readouterr().err


def test_push_subcommand_publishes_to_a_hub(demo_dir, tmp_path):
    from hub_server import LocalHub

    with LocalHub() as hub:
        env = hub.client_env(tmp_path / "hf_home")
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "scmmgpt.cli",
                "push",
                "--model",
                str(demo_dir / "instruction"),
                "--repo-id",
                "tester/demo",
                "--eval-results",
                str(demo_dir / "metrics.json"),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        files = set(hub.repos["tester/demo"].files)
    assert {"model.safetensors", "config.json", "README.md", "processor_config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_output_never_destroys_the_input(demo_dir, cells_h5ad, tmp_path, monkeypatch, capsys):
    """--output equal to --input is refused without --overwrite; with it, the input is replaced only by a complete
    result; a write that fails part-way (a full disk) leaves neither the final file nor a temporary one, and the
    input byte-identical."""
    model = str(demo_dir / "instruction")
    source = tmp_path / "mine.h5ad"
    source.write_bytes(_bytes(cells_h5ad))
    before = _bytes(source)
    describe = ["describe", "--model", model, "--input", str(source), "--max-new-tokens", "2"]
    assert main([*describe, "--output", str(source)]) == 2
    assert "is the --input file" in capsys.readouterr().err and _bytes(source) == before

    def full_disk(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half an h5ad")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", full_disk)
    assert main([*describe, "--output", str(source), "--overwrite"]) == 2
    assert "No space left" in capsys.readouterr().err
    assert _bytes(source) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine.h5ad"]
    assert main([*describe, "--output", str(tmp_path / "new.h5ad")]) == 2
    assert not (tmp_path / "new.h5ad").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mine.h5ad"]
    monkeypatch.undo()

    assert main([*describe, "--output", str(source), "--overwrite"]) == 0
    described = ad.read_h5ad(source)
    assert "scmmgpt_description" in described.obs and described.n_obs == 12
    assert (
        main(["describe", "--model", model, "--input", cells_h5ad, "--output", str(tmp_path / "missing" / "d.csv")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert main(["describe", "--model", model, "--input", cells_h5ad, "--output", str(tmp_path / "d.txt")]) == 2
