"""Publish to a Hub server on 127.0.0.1 (tests/hub_server.py) through huggingface_hub's real HTTP client, then
load it back, with and without the scmmgpt package installed."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from hub_server import LocalHub


TESTS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS)

PUBLISH = """
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoProcessor
import modeling_scmmgpt
from modeling_scmmgpt.hub import push_to_hub
from conftest import make_tokenizer, pbmc_cells
from modeling_scmmgpt import GeneVocab, ScMMGPTCellProcessor, ScMMGPTForConditionalGeneration
from tester import ScMMGPTModelTester

cells = pbmc_cells()
vocab = GeneVocab.from_genes(list(cells.raw.var_names))
tester = ScMMGPTModelTester(ScMMGPTCellProcessor(vocab, max_genes=64, use_raw=True), make_tokenizer())
torch.manual_seed(0)
model = ScMMGPTForConditionalGeneration(tester.get_config()).eval()
results = {"dataset": {"name": "PBMC 68k reduced", "type": "pbmc68k_reduced", "split": "test"},
           "results": {"cell-type-annotation": {"accuracy": 0.5, "macro_f1": 0.25}}}
push_to_hub(model, tester.processor, "tester/tiny-scmmgpt", eval_results=results, max_shard_size="300KB",
            base_models=["HuggingFaceTB/SmolLM2-135M-Instruct"], datasets=["scanpy/pbmc68k_reduced"])
inputs, _ = tester.describe_inputs(cells[:3])
with torch.no_grad():
    expected = model(**inputs).logits
reloaded = AutoModelForCausalLM.from_pretrained("tester/tiny-scmmgpt").eval()
processor = AutoProcessor.from_pretrained("tester/tiny-scmmgpt")
again = processor(text=[processor.build_prompt("Describe this cell.", response="cell type: B cell.")] * 3, cells=cells[:3])
with torch.no_grad():
    got = reloaded(**again).logits
save_file({"expected": expected, **{k: v for k, v in inputs.items()}}, sys.argv[1])
print(json.dumps({"same_inputs": all(torch.equal(inputs[k], again[k]) for k in inputs),
                  "max_diff": float((got - expected).abs().max()), "type": type(reloaded).__name__}))
"""

REMOTE_CODE = """
import builtins, json, sys, torch
real_import = builtins.__import__
def no_scmmgpt(name, *args, **kwargs):  # a user without the package
    if name.split(".")[0] in ("modeling_scmmgpt", "trainers", "hub_cards"):
        raise ImportError(f"No module named {name!r}")
    return real_import(name, *args, **kwargs)
builtins.__import__ = no_scmmgpt
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoProcessor
saved = load_file(sys.argv[1])
try:
    AutoModelForCausalLM.from_pretrained("tester/tiny-scmmgpt")
    refused = False
except Exception:
    refused = True
model = AutoModelForCausalLM.from_pretrained("tester/tiny-scmmgpt", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("tester/tiny-scmmgpt", trust_remote_code=True)
with torch.no_grad():
    got = model(**{k: v for k, v in saved.items() if k != "expected"}).logits
print(json.dumps({"refused_without_trust": refused, "max_diff": float((got - saved["expected"]).abs().max()),
                  "module": type(model).__module__, "processor": type(processor).__name__}))
"""

PUSH_PROCESSOR = """
import json, tempfile, torch
from transformers import AutoFeatureExtractor, AutoProcessor
from conftest import make_tokenizer, pbmc_cells
from modeling_scmmgpt import GeneVocab, ScMMGPTCellProcessor, ScMMGPTProcessor

cells = pbmc_cells()
qformer = make_tokenizer()
qformer.add_tokens(["qformer-only"])
cell_processor = ScMMGPTCellProcessor(GeneVocab.from_genes(list(cells.raw.var_names)), max_genes=64, use_raw=True)
processor = ScMMGPTProcessor(cell_processor, make_tokenizer(), qformer, num_cell_tokens=3)
processor.push_to_hub("tester/processor")
with tempfile.TemporaryDirectory() as folder:
    processor.save_pretrained(folder, push_to_hub=True, repo_id="tester/processor-saved")
text = [processor.build_prompt("Describe this cell.")] * 2
expected = processor(text=text, cells=cells[:2])
same = {}
for repo in ("tester/processor", "tester/processor-saved"):
    loaded = AutoProcessor.from_pretrained(repo)
    got = loaded(text=text, cells=cells[:2])
    same[repo] = (type(loaded).__name__, all(torch.equal(got[k], expected[k]) for k in expected),
                  loaded.qformer_tokenizer("qformer-only")["input_ids"] == qformer("qformer-only")["input_ids"])
print(json.dumps({"same": same, "feature_extractor": type(AutoFeatureExtractor.from_pretrained("tester/processor")).__name__}))
"""


def _run(script, env, *args):
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        cwd=TESTS,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # transformers' trust_remote_code prompt may share the line with our JSON result
    lines = [line[line.index('{"') :] for line in out.stdout.splitlines() if '{"' in line]
    assert lines, f"no result printed; stdout: {out.stdout[-2000:]} stderr: {out.stderr[-2000:]}"
    return json.loads(lines[-1])


@pytest.fixture
def hub_env(tmp_path):
    with LocalHub() as hub:
        env = hub.client_env(tmp_path / "hf_home", PYTHONPATH=os.pathsep.join([REPO_ROOT, TESTS]))
        yield hub, env


def test_publish_then_load_gives_identical_outputs(hub_env, tmp_path):
    hub, env = hub_env
    result = _run(PUBLISH, env, str(tmp_path / "io.safetensors"))
    assert result == {"same_inputs": True, "max_diff": 0.0, "type": "ScMMGPTForConditionalGeneration"}
    files = sorted(hub.repos["tester/tiny-scmmgpt"].files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files  # sharded above max_shard_size
    for name in (
        "processor_config.json",
        "qformer_tokenizer/tokenizer.json",
        "tokenizer.json",
        "modeling_scmmgpt.py",
        "configuration_scmmgpt.py",
        "README.md",
    ):
        assert name in files, name
    config = json.loads(hub.repos["tester/tiny-scmmgpt"].files["config.json"])
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_scmmgpt.ScMMGPTForConditionalGeneration"

    # The card, parsed back by huggingface_hub's own model-card code
    from huggingface_hub import ModelCard

    card = ModelCard(hub.repos["tester/tiny-scmmgpt"].files["README.md"].decode())
    data = card.data
    assert data.license == "apache-2.0" and data.library_name == "transformers"
    assert {"single-cell", "biology"} <= set(data.tags) and data.pipeline_tag == "text-generation"
    assert data.base_model == ["HuggingFaceTB/SmolLM2-135M-Instruct"] and data.datasets == ["scanpy/pbmc68k_reduced"]
    metrics = {(r.task_type, r.metric_type): r.metric_value for r in data.eval_results}
    assert metrics == {("cell-type-annotation", "accuracy"): 0.5, ("cell-type-annotation", "macro_f1"): 0.25}
    assert 'from_pretrained("tester/tiny-scmmgpt")' in card.text and "## Limitations" in card.text
    assert "# tiny-scmmgpt\n" in card.text and "\ntiny-scmmgpt is a [scMMGPT]" in card.text  # the title is named
    assert "| cell-type-annotation | accuracy | 0.5 |" in card.text  # the evaluation as a table

    remote = _run(REMOTE_CODE, env, str(tmp_path / "io.safetensors"))
    assert remote["refused_without_trust"] is True
    assert remote["max_diff"] == 0.0
    assert remote["module"].startswith("transformers_modules.") and remote["processor"] == "ScMMGPTProcessor"


def test_processor_push_to_hub_round_trips_through_the_library(hub_env):
    """`push_to_hub` and `save_pretrained(push_to_hub=True)` are transformers' own; the gene vocabulary and the
    Q-Former's tokenizer travel with the processor, and `AutoProcessor`/`AutoFeatureExtractor` read them back."""
    hub, env = hub_env
    result = _run(PUSH_PROCESSOR, env)
    assert result == {
        "same": {repo: ["ScMMGPTProcessor", True, True] for repo in ("tester/processor", "tester/processor-saved")},
        "feature_extractor": "ScMMGPTCellProcessor",
    }
    for repo in ("tester/processor", "tester/processor-saved"):
        files = hub.repos[repo].files
        assert {
            "processor_config.json",
            "tokenizer.json",
            "qformer_tokenizer/tokenizer.json",
        } <= set(files)
        assert "feature_extractor" in json.loads(files["processor_config.json"])
