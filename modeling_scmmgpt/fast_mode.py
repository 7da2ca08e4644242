"""Inference precision that is measured before it is chosen.

bf16 is not uniformly faster on CPUs. On a 2-core AMD EPYC with AVX512-BF16 (torch 2.13), a 512-wide linear runs
3-4x faster with bf16 weights than in fp32, but `scaled_dot_product_attention` is no faster (sometimes 1.7x slower)
in bf16; two bf16 matmuls around a float32 softmax ("eager" attention) are 2x faster than it at a cell's 230
expressed genes, and slower at 1,200 genes. On AVX2-only CPUs bf16 is emulated and several times slower
everywhere. So the fast mode times each component on this machine at the model's own sizes: the linears in both
precisions, the attention in both precisions with both kernels, and padded against packed batches; it takes an
alternative only where it measured clearly faster. The choice is cached per machine, torch version, thread count
and model shape, and says what it chose and why (`FastMode.describe()`).

    mode = model.enable_fast_mode()   # or apply_fast_mode(model, choose_fast_mode(model.config))
    print(mode.describe())
"""

import copy
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .packing import PackedCells, packed_attention
from .utils import PRECISION_ENV, atomic_write_text, cpu_flags, cpu_has_native_bf16, cpu_info, precision_forced


# The faster option is taken only when its median time is at most this fraction of the baseline's: a tie, or a gain
# within a noisy machine's jitter, keeps the baseline, so the fast mode is never slower by its own measurement.
MARGIN = 0.9
CACHE_ENV = "SCMMGPT_CACHE_DIR"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Each measured component: its baseline, then the alternatives the fast mode may take instead. An attention option
# is its precision, then " eager" for the matmul kernel (else torch's fused SDPA).
COMPONENTS = {
    "linear": ("fp32", "bf16"),
    "attention": ("fp32", "bf16", "fp32 eager", "bf16 eager"),
    "packing": ("padded", "packed"),
}
# Bumped when the measured options change, so that older cached measurements are taken again.
_MEASUREMENT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class FastMode:
    """What the fast mode runs, per component.

    Attributes:
        linear (`str`): `"bf16"` (the weights are cast to bf16) or `"fp32"`; covers every linear, embedding and
            norm, i.e. the model's weights.
        attention (`str`): the precision the cell encoder's attention computes in, `"bf16"` or `"fp32"` (with bf16
            weights, queries, keys and values are cast up for it and the output cast back), then `" eager"` where
            it runs as two matmuls around a float32 softmax instead of torch's fused SDPA kernel.
        packing (`str`): `"packed"` (padded batches run only their real gene tokens, where the config leaves
            `pack_padded_cells` to auto) or `"padded"`.
        source (`str`): why: `"measured"`, `"cached"`, `"forced by SCMMGPT_CPU_BF16"`, `"GPU"`, `"no native bf16"`.
        timings (`dict`): the medians behind a measured choice, `{component: {option: seconds}}`.
    """

    linear: str
    attention: str
    packing: str
    source: str
    timings: dict = dataclasses.field(default_factory=dict)

    @property
    def attention_dtype(self) -> torch.dtype:
        return _DTYPES[self.attention.split()[0]]

    @property
    def attention_kernel(self) -> str:
        """`"eager"` or `"sdpa"`."""
        return "eager" if self.attention.endswith(" eager") else "sdpa"

    def describe(self) -> str:
        parts = []
        for component in COMPONENTS:
            chosen, times = getattr(self, component), self.timings.get(component)
            detail = ", ".join(f"{option} {seconds * 1e3:.1f} ms" for option, seconds in (times or {}).items())
            parts.append(f"{component} {chosen}" + (f" ({detail})" if detail else ""))
        return f"fast mode: {'; '.join(parts)}; {self.source}"


def interleaved_medians(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, timed in alternation (one round calls each once, in a rotated order) so
    that a slow spell of a shared machine hits every mode alike. Returns every round's time per function, sorted;
    the median is robust to the odd stall. One warm-up call each first."""
    names = list(functions)
    for name in names:
        functions[name]()
    seconds = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            start = time.perf_counter()
            functions[name]()
            seconds[name].append(time.perf_counter() - start)
    return {name: sorted(values) for name, values in seconds.items()}


def select_options(timings: dict[str, dict[str, float]], precision: str | None = None) -> dict[str, str]:
    """`{component: option}` from measured median seconds: a component's fastest alternative (bf16, eager, packed)
    only where it took at most `MARGIN` of its baseline's (fp32, padded) time. With `precision` (`"fp32"` or
    `"bf16"`, where it is forced or bf16 is not native), the linears take it, and the attention chooses its kernel
    among that precision's options, against that precision's fused kernel."""
    chosen = {}
    for component, times in timings.items():
        options = [option for option in COMPONENTS[component] if option in times]
        if precision is not None and component != "packing":
            options = [option for option in options if option.split()[0] == precision]
        baseline, alternatives = options[0], options[1:]
        fastest = min(alternatives, key=times.__getitem__, default=baseline)
        chosen[component] = fastest if times[fastest] <= MARGIN * times[baseline] else baseline
    return chosen


def measure_components(cell_model_class, cell_config, genes: int, repeats: int = 5) -> dict[str, dict[str, float]]:
    """Median seconds of the encoder's kinds of work at `cell_config`'s sizes, each way: its linears in fp32 and
    bf16 and its attention in fp32 and bf16 with the fused and the eager kernel (one call per cell, as packed
    batches run it, for two cells of `genes` genes), and one encoder layer of `cell_model_class` on a padded batch
    run padded and packed (two cells, of 60% and 100% of `genes` genes, as cells' expressed genes vary)."""
    hidden, heads = cell_config.hidden_size, cell_config.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(2 * genes, hidden, generator=generator)
    weights = [torch.randn(out, hidden, generator=generator) * 0.02 for out in (hidden, cell_config.intermediate_size)]
    qkv = torch.randn(3, 2 * genes, heads, hidden // heads, generator=generator)
    cells = PackedCells.from_mask(torch.ones(2, genes, dtype=torch.bool))
    functions = {}
    for precision, dtype in _DTYPES.items():
        x, ws, (q, k, v) = tokens.to(dtype), [w.to(dtype) for w in weights], qkv.to(dtype)
        functions[("linear", precision)] = lambda x=x, ws=ws: [F.linear(x, w) for w in ws]
        for kernel, suffix in (("sdpa", ""), ("eager", " eager")):
            functions[("attention", precision + suffix)] = lambda q=q, k=k, v=v, kernel=kernel: packed_attention(
                q, k, v, cells, hidden**-0.5, 0.0, kernel
            )
    # One layer at the real sizes, with a 4-gene vocabulary: the embedding table does not matter to the timing.
    layer_config = copy.deepcopy(cell_config)
    layer_config.update({"vocab_size": 6, "pad_token_id": 4, "cls_token_id": 5, "num_hidden_layers": 1})
    layer_config.pack_padded_cells = None
    layer = cell_model_class(layer_config).eval()
    lengths = torch.tensor([0.6, 1.0]).mul(genes).long()
    mask = (torch.arange(genes)[None] < lengths[:, None]).long()
    gene_ids = torch.randint(0, 4, (2, genes), generator=generator).masked_fill(mask == 0, 4)
    values = torch.rand(2, genes, generator=generator)
    for option in COMPONENTS["packing"]:
        functions[("packing", option)] = lambda packed=option == "packed": _run_layer(
            layer, packed, gene_ids, values, mask
        )
    with torch.inference_mode():
        seconds = interleaved_medians(functions, repeats)
    timings = {}
    for (component, option), rounds in seconds.items():
        timings.setdefault(component, {})[option] = statistics.median(rounds)
    return timings


def _run_layer(model, packed: bool, gene_ids, values, mask):
    model.fast_mode_packing = packed
    return model(gene_ids, values, mask)


def _cache_path() -> str:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "scmmgpt")
    return os.path.join(root, "fast_mode.json")


def _machine_key(config, genes: int) -> str:
    """The measurement's identity: a different CPU, torch, thread count or model shape measures again."""
    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma"))))
    parts = [
        platform.processor() or platform.machine(),
        cpu_info("model name"),
        hashlib.sha1(flags.encode()).hexdigest()[:12],
        torch.__version__,
        f"threads={torch.get_num_threads()}",
        f"{config.hidden_size}x{config.num_attention_heads}x{config.intermediate_size}",
        f"genes={genes}",
        f"v{_MEASUREMENT_VERSION}",
    ]
    return "|".join(parts)


def choose_fast_mode(
    cell_model_class, cell_config, device: str | torch.device = "cpu", genes: int = 1200, refresh: bool = False
):
    """The [`FastMode`] for a cell encoder (`cell_model_class`, e.g. `ScMMGPTCellModel`) of `cell_config`'s sizes on
    `device`, with cells of about `genes` genes.

    GPUs take bf16 throughout, packed. On a CPU, each component is measured (about a second) and the choice cached
    per machine in `$SCMMGPT_CACHE_DIR/fast_mode.json` (default `~/.cache/scmmgpt`); `refresh=True` measures
    again. `SCMMGPT_CPU_BF16=1`/`0` forces bf16/fp32 precision (to test either path on any CPU), and a CPU without
    native bf16 keeps fp32 whatever its measurement says (bf16 is still timed once, so the cache shows why); packing
    follows the measurement either way."""
    if torch.device(device).type == "cuda":
        return FastMode("bf16", "bf16", "packed", "GPU")
    path, key = _cache_path(), _machine_key(cell_config, genes)
    cache = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                cache = json.load(f)
        except (OSError, json.JSONDecodeError):
            cache = {}  # a damaged cache only costs a new measurement
    if key in cache and not refresh:
        timings, source = cache[key], f"cached ({path})"
    else:
        timings, source = measure_components(cell_model_class, cell_config, genes), "measured"
        cache[key] = timings
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps(cache, indent=1))
    precision = None
    if precision_forced() or not cpu_has_native_bf16():
        precision = "bf16" if cpu_has_native_bf16() else "fp32"
        why = f"forced by {PRECISION_ENV}" if precision_forced() else "no native bf16 (AVX512-BF16 or AMX) here"
        source = f"{source}; precision {precision}: {why}"
    chosen = select_options(timings, precision)
    return FastMode(chosen["linear"], chosen["attention"], chosen["packing"], source, timings)


def apply_fast_mode(model: torch.nn.Module, mode: FastMode) -> torch.nn.Module:
    """Casts `model`'s weights to `mode.linear`'s precision and sets the cell encoder's attention precision and
    packing, in place. Meant for inference: training keeps fp32 weights (stage 3 uses autocast instead)."""
    model.to(_DTYPES[mode.linear])
    # A machine's choices, not properties of the weights: set at run time, never saved in the config. The modules
    # are found by these run-time attributes (the cell attention's and the cell encoder's), so that this module
    # needs no import of the models that mix `FastModeMixin` in.
    for module in model.modules():
        if hasattr(module, "attention_dtype"):
            module.attention_dtype = mode.attention_dtype if mode.attention_dtype != _DTYPES[mode.linear] else None
            module.attention_kernel = mode.attention_kernel
        if hasattr(module, "fast_mode_packing"):
            module.fast_mode_packing = mode.packing == "packed"
    return model


class FastModeMixin:
    """`enable_fast_mode()` for the scMMGPT models (the cell encoder alone, and the whole model)."""

    def enable_fast_mode(self, genes: int = 1200, refresh: bool = False) -> FastMode:
        """Switches this model, in place, to the fastest precision measured on its device ([`choose_fast_mode`]),
        for inference; returns the [`FastMode`] chosen (`.describe()` says what and why), also kept as
        `self.fast_mode`. `genes`: about how many genes the cells have (the attention's share grows with it)."""
        cell_config = getattr(self.config, "cell_config", self.config)
        cell_model = next(m for m in self.modules() if hasattr(m, "fast_mode_packing"))
        mode = choose_fast_mode(type(cell_model), cell_config, self.device, genes, refresh)
        apply_fast_mode(self, mode)
        self.fast_mode = mode
        return mode
