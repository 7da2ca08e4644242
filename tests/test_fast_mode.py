"""The fast mode measures each component on this machine and never takes an option its measurement found slower;
the choice is cached per machine, the forced precision switch still decides the path, and the mode changes the
speed, not the answer."""

import json

import numpy as np
import pytest
import torch
from tester import tiny_cell_config
from transformers import pipeline

from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellModel
from modeling_scmmgpt import fast_mode as fm
from modeling_scmmgpt.utils import PRECISION_ENV, cpu_has_native_bf16


def tiny_config(**overrides) -> ScMMGPTCellConfig:
    return tiny_cell_config(**{"d_model": 32, "nhead": 4, "nlayers": 2, "d_hid": 48, "dropout": 0.0, **overrides})


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.CACHE_ENV, str(tmp_path))
    return tmp_path


def test_selection_takes_an_alternative_only_where_it_measured_clearly_faster():
    timings = {
        "linear": {"fp32": 10.0, "bf16": 3.0},
        "attention": {"fp32": 10.0, "bf16": 9.5},  # within the margin: a noisy tie keeps fp32
        "packing": {"padded": 10.0, "packed": 12.0},
    }
    assert fm.select_options(timings) == {"linear": "bf16", "attention": "fp32", "packing": "padded"}
    timings["attention"]["bf16"] = fm.MARGIN * 10.0
    assert fm.select_options(timings)["attention"] == "bf16"
    # The fastest of several alternatives, and a forced precision chooses its kernel among its own options only.
    timings["attention"].update({"fp32 eager": 9.5, "bf16 eager": 4.0})
    assert fm.select_options(timings)["attention"] == "bf16 eager"
    assert fm.select_options(timings, "fp32") == {"linear": "fp32", "attention": "fp32", "packing": "padded"}
    timings["attention"]["fp32 eager"] = 8.0
    assert fm.select_options(timings, "fp32")["attention"] == "fp32 eager"
    assert fm.select_options(timings, "bf16") == {"linear": "bf16", "attention": "bf16 eager", "packing": "padded"}
    timings["attention"]["bf16 eager"] = 8.5  # not within the margin of bf16's fused 9.0
    assert fm.select_options(timings, "bf16")["attention"] == "bf16"
    mode = fm.FastMode("bf16", "fp32 eager", "packed", "test", timings)
    assert (mode.attention_dtype, mode.attention_kernel) == (torch.float32, "eager")
    assert "attention fp32 eager (fp32 10000.0 ms, bf16 9000.0 ms, fp32 eager 8000.0 ms" in mode.describe()


def test_the_measured_choice_is_never_slower_than_its_baseline(cache_dir, monkeypatch):
    """On this machine, unforced: every component's chosen option took no longer than its baseline in the very
    measurement the choice came from (the cache holds it)."""
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    mode = fm.choose_fast_mode(ScMMGPTCellModel, ScMMGPTCellConfig(), genes=256, refresh=True)
    assert mode.source == "measured" or "no native bf16" in mode.source
    saved = json.loads((cache_dir / "fast_mode.json").read_text())
    assert list(saved.values()) == [mode.timings]
    for component, options in fm.COMPONENTS.items():
        chosen, times = getattr(mode, component), mode.timings[component]
        assert set(times) == set(options) and all(t > 0 for t in times.values())
        baseline = options[0] if component == "packing" else mode.linear  # a fixed precision is its own baseline
        assert times[chosen] <= times[baseline], (component, times)
    if not cpu_has_native_bf16():
        assert mode.linear == mode.attention.split()[0] == "fp32"


def test_the_choice_is_cached_per_machine_and_model_shape(cache_dir, monkeypatch):
    calls = []

    def fake_measure(cell_model_class, cell_config, genes, repeats=5):
        calls.append((cell_config.hidden_size, genes))
        return {"linear": {"fp32": 2.0, "bf16": 1.0}, "attention": {"fp32": 1.0, "bf16": 2.0},
                "packing": {"padded": 2.0, "packed": 1.0}}  # fmt: skip

    monkeypatch.setattr(fm, "measure_components", fake_measure)
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    first = fm.choose_fast_mode(ScMMGPTCellModel, tiny_config(), genes=100)
    again = fm.choose_fast_mode(ScMMGPTCellModel, tiny_config(), genes=100)
    assert calls == [(32, 100)] and again.source.startswith("cached") and again.timings == first.timings
    fm.choose_fast_mode(ScMMGPTCellModel, tiny_config(d_model=64), genes=100)  # another shape measures again
    fm.choose_fast_mode(ScMMGPTCellModel, tiny_config(), genes=100, refresh=True)
    assert calls == [(32, 100), (64, 100), (32, 100)]
    (cache_dir / "fast_mode.json").write_text("{not json")  # a damaged cache costs a measurement, not an error
    assert (
        fm.choose_fast_mode(ScMMGPTCellModel, tiny_config(), genes=100).source == "measured"
        or not cpu_has_native_bf16()
    )
    assert len(calls) == 4
    assert fm.choose_fast_mode(ScMMGPTCellModel, tiny_config(), device="cuda").source == "GPU" and len(calls) == 4


@pytest.mark.parametrize("forced", ["1", "0"])
def test_the_precision_switch_decides_the_path(cache_dir, monkeypatch, forced):
    monkeypatch.setenv(PRECISION_ENV, forced)
    mode = fm.choose_fast_mode(ScMMGPTCellModel, tiny_config(), genes=64)
    precision = "bf16" if forced == "1" else "fp32"
    assert mode.linear == mode.attention.split()[0] == precision and f"forced by {PRECISION_ENV}" in mode.source
    assert mode.packing in ("padded", "packed") and precision in mode.describe()


def padded_cells(config, lengths=(9, 4, 7), width=9):
    generator = torch.Generator().manual_seed(1)
    genes = torch.full((len(lengths), width), config.pad_token_id)
    values = torch.zeros(len(lengths), width)
    for row, n in enumerate(lengths):
        genes[row, :n] = torch.randint(0, config.pad_token_id, (n,), generator=generator)
        genes[row, 0] = config.cls_token_id
        values[row, 1:n] = torch.rand(n - 1, generator=generator) * 5
    return genes, values, genes.ne(config.pad_token_id).long()


# (weights, attention): each precision with each attention kernel.
MODES = [
    ("bf16", "fp32"),
    ("bf16", "bf16"),
    ("fp32", "fp32"),
    ("bf16", "bf16 eager"),
    ("bf16", "fp32 eager"),
    ("fp32", "fp32 eager"),
]


@pytest.mark.parametrize("linear, attention", MODES)
@pytest.mark.parametrize("packing", ["padded", "packed"])
def test_the_mode_changes_speed_not_the_answer(linear, attention, packing):
    torch.manual_seed(0)
    config = tiny_config()
    reference = ScMMGPTCellModel(config).eval()
    model = ScMMGPTCellModel(config).eval()
    model.load_state_dict(reference.state_dict())
    fm.apply_fast_mode(model, fm.FastMode(linear, attention, packing, "test"))
    assert model.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[linear]
    attention_dtypes = {layer.self_attn.attention_dtype for layer in model.layers}
    assert attention_dtypes == {torch.float32 if (linear, attention.split()[0]) == ("bf16", "fp32") else None}
    kernels = {layer.self_attn.attention_kernel for layer in model.layers}
    assert kernels == {"eager" if attention.endswith("eager") else "sdpa"}
    batch = padded_cells(config)
    keep = batch[2].bool()
    with torch.inference_mode():
        expected, got = reference(*batch).last_hidden_state, model(*batch).last_hidden_state.float()
    assert bool(got[~keep].eq(0).all()) is (packing == "packed")  # packed runs leave padding untouched (zero)
    cosine = torch.nn.functional.cosine_similarity(got[:, 0], expected[:, 0], dim=-1)
    if linear == "fp32":
        torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)
    else:
        assert float(cosine.min()) > 0.999
    assert model.config.to_dict() == reference.config.to_dict()  # a machine's choice is never saved


def test_enable_fast_mode_runs_the_pipelines(cache_dir, monkeypatch, pbmc_cell_processor, pbmc):
    """The whole model in the fast mode (bf16 forced, whatever this CPU is) through the feature and annotation
    pipelines: float32 results that agree with fp32."""
    from conftest import make_tokenizer
    from tester import ScMMGPTModelTester

    from modeling_scmmgpt import ScMMGPTForConditionalGeneration

    tester = ScMMGPTModelTester(pbmc_cell_processor, make_tokenizer())
    torch.manual_seed(0)
    config = tester.get_config()
    config.qformer_config.vocab_size = len(tester.processor.tokenizer)
    model = ScMMGPTForConditionalGeneration(config).eval()
    cells = pbmc[:24]
    reference = pipeline("cell-feature-extraction", model=model, processor=tester.processor)(cells, progress=False)
    monkeypatch.setenv(PRECISION_ENV, "1")
    mode = model.enable_fast_mode(genes=64)
    assert model.fast_mode is mode and model.dtype == torch.bfloat16
    fast = pipeline("cell-feature-extraction", model=model, processor=tester.processor)(cells, progress=False)
    assert fast.dtype == np.float32 and fast.shape == reference.shape
    assert float((fast * reference).sum(1).min()) > 0.99
    annotator = pipeline("cell-type-annotation", model=model, processor=tester.processor)
    ranked = annotator(cells[:4], candidate_labels=["B cell", "natural killer cell"], top_k=2, progress=False)
    assert all(len(r) == 2 and 0 <= r[0]["score"] <= 1 for r in ranked)
