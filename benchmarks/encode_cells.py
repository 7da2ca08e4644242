"""Cells/s of the cell encoder plus Q-Former at scGPT whole-human sizes, in fp32 and in bf16, and the fraction of
this machine's GEMM FLOP/s (measured in the same run) that the encoder reaches.

    python benchmarks/encode_cells.py [--batch-size 8] [--genes 1200] [--repeats 3] [--vs-scgpt]

Sizes: d_model 512, 12 layers, 8 heads, d_hid 512, vocab 60,697 (scGPT's whole-human checkpoint), and BLIP-2's
default Q-Former (768 wide, 12 layers, cross-attention every 2nd layer) with 32 queries. FLOPs are counted by
torch's FlopCounterMode on one forward pass. For scale, scGPT's own implementation ran at about 1.07 cells/s on
this 2-core CPU in fp32 (shared/scgpt_oracle/README.md).

`--vs-scgpt [--device cuda]` runs scGPT's own `TransformerModel` (from the installed `scgpt` package) and our
encoder side by side on the same converted random weights and the same cells, twice: real PBMC expression values
(binned per cell) on 1,200 census genes per cell, and real cells with their expressed genes only (padded to the
longest; ours packs them, so no compute goes to padding). It prints cells/s for scGPT (fp32, torch's fast path),
ours in fp32 and ours in its fast mode (`fast_autocast()`: bf16 on GPUs and on CPUs that compute it natively, else
fp32), their ratios, the fp32 difference to scGPT and the cosine of fast-mode to fp32 cell embeddings.
"""

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from modeling_scmmgpt import ScMMGPTConfig
from modeling_scmmgpt.modeling_scmmgpt import ScMMGPTCellTower
from modeling_scmmgpt.utils import cpu_has_native_bf16, fast_autocast


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


def time_forward(tower, batch, autocast: bool, repeats: int) -> float:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        tower(*batch)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            tower(*batch)
    return (time.perf_counter() - start) / repeats


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
    return (real["gene_ids"], real["values"], real["attention_mask"])


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


def vs_scgpt(args) -> None:
    import os
    import sys

    from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellModel
    from modeling_scmmgpt.convert_scgpt import convert_scgpt_state_dict

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from scgpt_reference import load_scgpt_model_module  # the tests' loader of scGPT's own model code

    device = torch.device(args.device)
    module = load_scgpt_model_module()
    config = ScMMGPTCellConfig()
    vocab = {f"g{i}": i for i in range(config.vocab_size - 3)}
    vocab.update({"<pad>": config.pad_token_id, "<cls>": config.cls_token_id, "<eoc>": config.vocab_size - 1})
    torch.manual_seed(0)
    scgpt = module.TransformerModel(
        ntoken=config.vocab_size,
        d_model=512,
        nhead=8,
        d_hid=512,
        nlayers=12,
        vocab=vocab,
        dropout=0.2,
        pad_token="<pad>",
        pad_value=-2,
        do_mvc=True,
    ).eval()
    ours = ScMMGPTCellModel(config).eval()
    ours.load_state_dict(convert_scgpt_state_dict(scgpt.state_dict(), list(ours.state_dict()))[0])
    scgpt, ours = scgpt.to(device), ours.to(device)
    real = pbmc_cells(args.batch_size, args.genes)
    full = pbmc_batch(real, args.genes, config.vocab_size, config.cls_token_id, config.pad_value)
    fast_dtype = "bf16 autocast" if device.type == "cuda" or cpu_has_native_bf16() else "fp32 (no native bf16 here)"
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"{torch.get_num_threads()} CPU threads; batch {args.batch_size}; fast mode = {fast_dtype}"
    )

    def timed(fn):
        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        with torch.inference_mode():
            out = fn()
            sync()
            start = time.perf_counter()
            for _ in range(args.repeats):
                fn()
            sync()
        return out, args.batch_size * args.repeats / (time.perf_counter() - start)

    for title, batch in (
        (f"{args.genes} genes per cell (real PBMC genes, then census genes)", full),
        (
            f"expressed genes only (real PBMC cells, {int(real[2].sum(1).min())}-{int(real[2].sum(1).max())} genes, "
            f"padded to the longest)",
            real,
        ),
    ):
        gene_ids, values, mask = (t.to(device) for t in batch)
        pad_mask = gene_ids.eq(config.pad_token_id)

        def run_scgpt(autocast=False):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                return scgpt._encode(gene_ids, values, src_key_padding_mask=pad_mask)

        def run_ours(fast: bool):
            with fast_autocast(device.type, enabled=fast):
                return ours(gene_ids, values, mask).last_hidden_state

        reference, scgpt_rate = timed(run_scgpt)
        fp32, fp32_rate = timed(lambda: run_ours(False))
        fast, fast_rate = timed(lambda: run_ours(True))
        keep = mask.bool()
        cosine = torch.nn.functional.cosine_similarity(fast[:, 0].float(), fp32[:, 0], dim=-1).min()
        print(f"\n{title}")
        print(f"  scGPT TransformerModel (fp32):  {scgpt_rate:9.2f} cells/s")
        if device.type == "cuda":
            _, scgpt_bf16_rate = timed(lambda: run_scgpt(autocast=True))
            print(f"  scGPT under bf16 autocast:     {scgpt_bf16_rate:9.2f} cells/s  (for reference)")
        print(
            f"  ours fp32:                     {fp32_rate:9.2f} cells/s  ({fp32_rate / scgpt_rate:.2f}x scGPT), "
            f"max |diff| vs scGPT {float((fp32[keep] - reference[keep]).abs().max()):.2e}"
        )
        print(
            f"  ours fast mode:                {fast_rate:9.2f} cells/s  ({fast_rate / scgpt_rate:.2f}x scGPT; "
            f"target 3x), min cosine to fp32 cell embeddings {float(cosine):.5f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--genes", type=int, default=1200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vs-scgpt", action="store_true", help="time scGPT's own implementation side by side")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for --vs-scgpt")
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
    print(
        f"CPU has native bf16 (AVX512-BF16/AMX): {cpu_has_native_bf16()}; fast_autocast() uses "
        f"{'bf16' if cpu_has_native_bf16() else 'fp32'} here"
    )
    print(f"GEMM peak measured now: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    print(
        f"FLOPs per cell: encoder {encoder_flops / args.batch_size / 1e9:.1f} G, "
        f"encoder + Q-Former {total_flops / args.batch_size / 1e9:.1f} G"
    )
    results = {}
    for mode, autocast in (("fp32", False), ("bf16", True)):
        seconds = time_forward(tower, batch, autocast, args.repeats)
        enc_seconds = time_forward(tower.cell_model, batch, autocast, args.repeats)
        results[mode] = args.batch_size / seconds
        print(
            f"{mode}: {args.batch_size / seconds:.2f} cells/s (encoder + Q-Former); encoder alone "
            f"{args.batch_size / enc_seconds:.2f} cells/s = {encoder_flops / enc_seconds / peak[mode]:.0%} of {mode} GEMM peak"
        )
    print(
        f"bf16 / fp32 speed: {results['bf16'] / results['fp32']:.2f}x; GEMM bf16 / fp32: {peak['bf16'] / peak['fp32']:.2f}x"
    )
    print(
        f"fp32 vs scGPT's own implementation (1.07 cells/s quoted for this CPU class, not measured in this run): "
        f"{results['fp32'] / 1.07:.2f}x"
    )


if __name__ == "__main__":
    main()
