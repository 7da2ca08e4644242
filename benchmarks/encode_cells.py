"""Cells/s of the cell encoder plus Q-Former at scGPT whole-human sizes, in fp32 and in the fast mode, and the
fraction of this machine's GEMM FLOP/s (measured in the same run) that the encoder reaches.

    python benchmarks/encode_cells.py [--batch-size 8] [--genes 1200] [--repeats 3] [--vs-scgpt] [--remeasure]

Sizes: d_model 512, 12 layers, 8 heads, d_hid 512, vocab 60,697 (scGPT's whole-human checkpoint), and BLIP-2's
default Q-Former (768 wide, 12 layers, cross-attention every 2nd layer) with 32 queries. FLOPs are counted by
torch's FlopCounterMode on one forward pass.

`--vs-scgpt [--device cuda]` runs scGPT's own `TransformerModel` (from the installed `scgpt` package) and our
encoder side by side on the same converted random weights and the same cells, twice: real PBMC expression values
(binned per cell) on 1,200 census genes per cell, and real cells with their expressed genes only (padded to the
longest). It prints cells/s for scGPT (fp32, torch's fast path), ours in fp32, ours in the fast mode that
`modeling_scmmgpt.fast_mode.choose_fast_mode` picks on this machine (printed, with the timings behind it), ours
packed, and on CPUs ours with int8 dynamic-quantised linears (an option the library does not pick, for its
accuracy cost); the ratios to scGPT, the fp32 difference to scGPT and each mode's cosine to our fp32 cell
embeddings. All modes run in alternation in one process, several rounds; a rate is the median [min, max] over
rounds, so a noisy machine shows as spread instead of a wrong ratio. The first line names the date, device, torch,
threads and CPU flags.
"""

import argparse
import copy
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from modeling_scmmgpt import ScMMGPTConfig
from modeling_scmmgpt.fast_mode import interleaved_medians
from modeling_scmmgpt.modeling_scmmgpt import ScMMGPTCellTower


def gemm_flops_per_second(autocast: bool, size: int = 1024, seconds: float = 2.0) -> float:
    """GEMM throughput through `F.linear`, the path the encoder's layers take (under bf16 autocast or not)."""
    a, w = torch.randn(size, size), torch.randn(size, size)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.nn.functional.linear(a, w)
        count, start = 0, time.perf_counter()
        while count == 0 or time.perf_counter() - start < seconds:
            torch.nn.functional.linear(a, w)
            count += 1
    return 2 * size**3 * count / (time.perf_counter() - start)


def attention_flops(config: ScMMGPTConfig, batch_size: int, genes: int) -> tuple[float, float]:
    """QK^T and AV FLOPs, which FlopCounterMode does not see inside CPU SDPA: (encoder, Q-Former)."""
    cell, qformer, queries = config.cell_config, config.qformer_config, config.num_cell_tokens
    encoder = 4 * genes**2 * cell.hidden_size * cell.num_hidden_layers
    cross_layers = len(range(0, qformer.num_hidden_layers, qformer.cross_attention_frequency))
    qformer_attn = 4 * queries * qformer.hidden_size * (queries * qformer.num_hidden_layers + genes * cross_layers)
    return batch_size * encoder, batch_size * qformer_attn


def make_batch(config: ScMMGPTConfig, batch_size: int, genes: int):
    cell = config.cell_config
    generator = torch.Generator().manual_seed(0)
    gene_ids = torch.randint(0, cell.pad_token_id, (batch_size, genes), generator=generator)
    gene_ids[:, 0] = cell.cls_token_id
    values = torch.randint(1, cell.n_bins, (batch_size, genes), generator=generator).float()
    values[:, 0] = cell.pad_value
    return gene_ids, values, torch.ones(batch_size, genes, dtype=torch.long)


def pbmc_cells(batch_size: int, genes: int):
    """Real PBMC cells through our processor: `(expressed-genes batch, census vocab)`; the batch is each cell's
    expressed genes (at most `genes`), binned, padded to the longest cell, as scGPT's `embed_data` feeds them."""
    import warnings

    import anndata as ad

    from modeling_scmmgpt import GeneVocab, ScMMGPTCellProcessor
    from modeling_scmmgpt.resources import census_vocab_path, pbmc68k_reduced_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cells = ad.read_h5ad(pbmc68k_reduced_path())
    processor = ScMMGPTCellProcessor(GeneVocab.from_scgpt_json(census_vocab_path()), max_genes=genes, use_raw=True)
    real = processor(cells[:batch_size])
    return (real["cell_gene_ids"], real["cell_values"], real["cell_attention_mask"])


def pbmc_batch(real, genes: int, vocab_size: int, cls_id: int, pad_value: float):
    """Real PBMC cells' binned expression on `genes` census gene ids per cell (scGPT's input layout at its
    max_seq_len): each cell's real genes and bins first; its remaining slots up to `genes` are census genes with
    bins drawn like the real ones (PBMC measures only 765 genes)."""
    import numpy as np

    gene_ids_real, values_real, mask_real = real
    batch_size = len(gene_ids_real)
    rng = np.random.default_rng(0)
    gene_ids = torch.as_tensor(rng.choice(vocab_size - 3, size=(batch_size, genes), replace=True))
    keep = mask_real.bool()
    sampled = values_real[:, 1:][keep[:, 1:]]
    values = sampled[torch.randint(len(sampled), (batch_size, genes), generator=torch.Generator().manual_seed(0))]
    for row in range(batch_size):
        n = int(keep[row].sum())
        gene_ids[row, :n], values[row, :n] = gene_ids_real[row, :n], values_real[row, :n]
    gene_ids[:, 0], values[:, 0] = cls_id, pad_value
    return gene_ids, values, torch.ones(batch_size, genes, dtype=torch.long)


def _spread(values: list[float]) -> str:
    """`median [min, max]` of per-round rates."""
    return f"{statistics.median(values):8.2f} [{min(values):.2f}, {max(values):.2f}]"


def machine_line(device: torch.device) -> str:
    """What a figure was measured on: the date, the device, torch, the threads and the CPU's precision flags."""
    import datetime

    from modeling_scmmgpt.utils import cpu_flags, cpu_info

    flags = " ".join(
        sorted(f for f in cpu_flags() if f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"))
    )
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:  # family and model tell CPU generations apart where the name does not ("AMD EPYC": family 26 is Zen 5)
        where = f"{cpu_info('model name') or 'CPU'} (family {cpu_info('cpu family')}, model {cpu_info('model')})"
    return (
        f"{datetime.date.today()}, {where}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"CPU flags: {flags or 'none of avx2/avx512/amx'}"
    )


def vs_scgpt(args) -> None:
    import os
    import sys

    from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellModel
    from modeling_scmmgpt.convert_scgpt import convert_scgpt_state_dict
    from modeling_scmmgpt.fast_mode import apply_fast_mode, choose_fast_mode

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from scgpt_reference import load_scgpt_model_module, scgpt_transformer  # the tests' builders of scGPT's model

    device = torch.device(args.device)
    module = load_scgpt_model_module()
    config = ScMMGPTCellConfig()
    vocab = {f"g{i}": i for i in range(config.vocab_size - 3)}
    vocab.update({"<pad>": config.pad_token_id, "<cls>": config.cls_token_id, "<eoc>": config.vocab_size - 1})
    torch.manual_seed(0)
    sizes = (config.hidden_size, config.num_attention_heads, config.num_hidden_layers, config.intermediate_size)
    scgpt = scgpt_transformer(vocab, *sizes, module=module, do_mvc=True).eval()
    ours = ScMMGPTCellModel(config).eval()
    ours.load_state_dict(convert_scgpt_state_dict(scgpt.state_dict(), list(ours.state_dict()))[0])
    scgpt, ours = scgpt.to(device), ours.to(device)
    real = pbmc_cells(args.batch_size, args.genes)
    full = pbmc_batch(real, args.genes, config.vocab_size, config.cls_token_id, config.pad_value)
    print(machine_line(device))
    print(
        f"batch {args.batch_size}; cells/s as median [min, max] over {args.repeats} rounds that run the modes in "
        "alternation (rotated order) in this process, after one warm-up call each"
    )

    for title, batch, genes in (
        (f"{args.genes} genes per cell (real PBMC genes, then census genes)", full, args.genes),
        (
            f"expressed genes only (real PBMC cells, {int(real[2].sum(1).min())}-{int(real[2].sum(1).max())} genes, "
            f"padded to the longest)",
            real,
            int(real[2].sum(1).max()),
        ),
    ):
        gene_ids, values, mask = (t.to(device) for t in batch)
        pad_mask = gene_ids.eq(config.pad_token_id)
        mode = choose_fast_mode(ScMMGPTCellModel, config, device, genes=genes, refresh=args.remeasure)
        fast = apply_fast_mode(copy.deepcopy(ours), mode)
        models = {"ours fp32": ours, f"ours fast mode ({mode.linear} weights, {mode.attention} attention)": fast}
        if not bool(mask.all()):  # the packing the fast mode did not choose, for reference
            other = copy.deepcopy(fast)
            other.fast_mode_packing = mode.packing != "packed"
            models[f"ours fast mode, {'padded' if other.fast_mode_packing is False else 'packed'} instead"] = other
        if device.type == "cpu":
            # Not a mode the library picks (its cosine to fp32 is below 0.9999): shown for its accuracy cost.
            int8 = copy.deepcopy(ours)
            int8.layers = torch.ao.quantization.quantize_dynamic(int8.layers, {torch.nn.Linear}, dtype=torch.qint8)
            models["ours, int8 dynamic-quantised linears (opt-in option, not chosen)"] = int8

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        outputs = {}

        def timed(name, fn):
            def call():
                outputs[name] = fn()
                sync()

            return call

        calls = {"scGPT TransformerModel (fp32)": timed("scGPT", lambda: scgpt._encode(gene_ids, values, pad_mask))}
        for name, model in models.items():
            calls[name] = timed(name, lambda model=model: model(gene_ids, values, mask).last_hidden_state)
        with torch.inference_mode():
            seconds = interleaved_medians(calls, args.repeats)
        rates = {name: [args.batch_size / s for s in values] for name, values in seconds.items()}
        scgpt_rate = statistics.median(rates["scGPT TransformerModel (fp32)"])
        keep = mask.bool()
        reference = outputs["ours fp32"]
        print(f"\n{title}")
        print(f"  {mode.describe()}")
        if not bool(mask.all()):
            print(f"  the fast mode runs this padded batch {mode.packing}")
        for name, values in rates.items():
            line = f"  {name:66s} {_spread(values)} cells/s"
            if name != "scGPT TransformerModel (fp32)":
                cells = outputs[name][:, 0].float()
                cosine = torch.nn.functional.cosine_similarity(cells, reference[:, 0], dim=-1).min()
                line += (
                    f"  {statistics.median(values) / scgpt_rate:5.2f}x scGPT, min cosine to fp32 {float(cosine):.6f}"
                )
            print(line)
        difference = (reference[keep] - outputs["scGPT"][keep]).abs().max()
        print(f"  fp32 max |difference| to scGPT: {float(difference):.2e}; target: fast mode >= 3x scGPT")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--genes", type=int, default=1200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vs-scgpt", action="store_true", help="time scGPT's own implementation side by side")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for --vs-scgpt")
    parser.add_argument("--remeasure", action="store_true", help="measure the fast mode again, not from its cache")
    args = parser.parse_args()
    if args.vs_scgpt:
        return vs_scgpt(args)

    torch.manual_seed(0)
    config = ScMMGPTConfig(text_config={"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1})
    tower = ScMMGPTCellTower(config).eval().requires_grad_(False)
    batch = make_batch(config, args.batch_size, args.genes)

    encoder_attention, qformer_attention = attention_flops(config, args.batch_size, args.genes)
    with FlopCounterMode(display=False) as counter:
        tower.cell_model(*batch)
    encoder_flops = counter.get_total_flops() + encoder_attention
    with FlopCounterMode(display=False) as counter:
        tower(*batch)
    total_flops = counter.get_total_flops() + encoder_attention + qformer_attention

    peak = {"fp32": gemm_flops_per_second(False), "bf16": gemm_flops_per_second(True)}
    print(f"threads: {torch.get_num_threads()}  batch {args.batch_size} x {args.genes} genes")
    print(machine_line(torch.device("cpu")))
    print(f"GEMM peak measured now: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    print(
        f"FLOPs per cell: encoder {encoder_flops / args.batch_size / 1e9:.1f} G, "
        f"encoder + Q-Former {total_flops / args.batch_size / 1e9:.1f} G"
    )
    from modeling_scmmgpt import ScMMGPTCellModel
    from modeling_scmmgpt.fast_mode import apply_fast_mode, choose_fast_mode

    mode = choose_fast_mode(ScMMGPTCellModel, config.cell_config, genes=args.genes, refresh=args.remeasure)
    print(mode.describe())
    fast = apply_fast_mode(copy.deepcopy(tower), mode)
    calls = {
        "fp32": lambda: tower(*batch),
        "fast": lambda: fast(*batch),
        "fp32 encoder": lambda: tower.cell_model(*batch),
        "fast encoder": lambda: fast.cell_model(*batch),
    }
    with torch.inference_mode():
        seconds = {
            name: statistics.median(values) for name, values in interleaved_medians(calls, args.repeats).items()
        }
    for name, peak_name in (("fp32", "fp32"), ("fast", mode.linear)):
        print(
            f"{name}: {args.batch_size / seconds[name]:.2f} cells/s (encoder + Q-Former); encoder alone "
            f"{args.batch_size / seconds[name + ' encoder']:.2f} cells/s = "
            f"{encoder_flops / seconds[name + ' encoder'] / peak[peak_name]:.0%} of {peak_name} GEMM peak"
        )
    print(
        f"fast / fp32 speed: {seconds['fp32'] / seconds['fast']:.2f}x; GEMM bf16 / fp32: {peak['bf16'] / peak['fp32']:.2f}x"
    )


if __name__ == "__main__":
    main()
