"""The four pipelines on an accelerator against the same pipelines on the CPU, in one process: what each task gives
on the device beside what it gives on the CPU, and cells (prompts) per second on each.

    python benchmarks/pipelines_on_device.py --model DIR [--cells FILE.h5ad] [--n-cells 256] [--device 0]

`--device` is anything `pipeline(..., device=...)` takes (a GPU index, "cuda:0", a `torch.device` string). The model
is loaded once per device from `DIR`; the cells default to scanpy's 700 PBMCs. Agreement is reported as: the largest
difference and the smallest cosine between the two devices' cell features; the share of cells whose zero-shot and
generative labels agree; the share of identical descriptions (greedy decoding, so differences come from the
devices' arithmetic alone); and for text-to-cell, the correlation of the mean generated profile per prompt (the
draws themselves differ, since each device has its own random generator). The first line names the date, devices,
torch and transformers.
"""

import argparse
import datetime
import platform
import time

import numpy as np
import torch
import transformers
from transformers import pipeline

import modeling_scmmgpt  # noqa: F401  (registers the tasks)
from modeling_scmmgpt.resources import pbmc68k_reduced_path


PROMPTS = ["a B cell from blood", "a CD14-positive monocyte", "a natural killer cell", "a CD8-positive T cell"]


def _timed(run):
    """`run()` and its seconds. The pipelines return host arrays and lists, so the device's work is done when they
    return (no synchronisation needed)."""
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def run_tasks(model: str, cells, device, labels: list[str], batch_size: int) -> dict:
    """Each task's results and seconds on `device`, each task timed after a warm-up call on a few cells (the first
    kernels' start-up and one-off caches are not timed)."""
    results = {}
    extractor = pipeline("cell-feature-extraction", model=model, device=device)
    extractor(cells[:batch_size], batch_size=batch_size, progress=False)
    results["features"] = _timed(lambda: extractor(cells, batch_size=batch_size, progress=False))
    annotator = pipeline("cell-type-annotation", model=model, device=device)
    for mode in ("zero-shot", "generative"):
        annotator(cells[:4], candidate_labels=labels, mode=mode, progress=False)
        ranked, seconds = _timed(
            lambda: annotator(cells, candidate_labels=labels, mode=mode, batch_size=batch_size, progress=False)
        )
        results[mode] = ([r[0]["label"] for r in ranked], seconds)
    describer = pipeline("cell-description", model=model, device=device)
    describer(cells[:4], progress=False)
    results["descriptions"] = _timed(lambda: describer(cells, batch_size=batch_size, progress=False))
    generator = pipeline("text-to-cell", model=model, device=device)
    generator(PROMPTS[:1], n_cells=1, seed=0)
    results["generated"] = _timed(lambda: generator(PROMPTS, n_cells=16, seed=0))
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--cells", default=None, help="an .h5ad file (default: scanpy's 700 PBMCs)")
    parser.add_argument("--n-cells", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="0")
    args = parser.parse_args(argv)
    import anndata as ad

    device = int(args.device) if args.device.isdigit() else args.device
    cells = ad.read_h5ad(args.cells or pbmc68k_reduced_path())[: args.n_cells].copy()
    config = transformers.AutoConfig.from_pretrained(args.model)
    labels = list(getattr(config, "cell_codebook_labels", None) or getattr(config, "open_set_labels", None) or [])
    if not labels:
        raise SystemExit(f"{args.model} names no trained labels (cell_codebook_labels): pass a trained model.")
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else str(device)
    print(
        f"# {datetime.date.today()}: {name} against the CPU ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, transformers {transformers.__version__}; {len(cells)} cells, batch "
        f"{args.batch_size}, {len(labels)} candidate labels, {len(PROMPTS)} prompts x 16 generated cells"
    )
    on_cpu = run_tasks(args.model, cells, "cpu", labels, args.batch_size)
    on_device = run_tasks(args.model, cells, device, labels, args.batch_size)
    a, b = (torch.as_tensor(np.asarray(r["features"][0]), dtype=torch.float64) for r in (on_cpu, on_device))
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).min()
    print(f"features:     max |difference| {(a - b).abs().max():.2e}, min cosine {cosine:.6f}")
    for mode in ("zero-shot", "generative"):
        agree = np.mean([x == y for x, y in zip(on_cpu[mode][0], on_device[mode][0])])
        print(f"{mode + ':':<13} labels agree on {agree:.3f} of cells")
    same = np.mean([x == y for x, y in zip(on_cpu["descriptions"][0], on_device["descriptions"][0])])
    print(f"descriptions: identical for {same:.3f} of cells")
    correlations = []
    for i in range(len(PROMPTS)):
        means = [
            r["generated"][0].X[r["generated"][0].obs["prompt_index"].to_numpy() == i].mean(0)
            for r in (on_cpu, on_device)
        ]
        correlations.append(np.corrcoef(*means)[0, 1])
    finite = np.isfinite(on_device["generated"][0].X).all()
    print(f"generated:    mean profile per prompt, correlation {min(correlations):.4f} at worst; all finite: {finite}")
    print("task            cpu (items/s)  device (items/s)  device / cpu")
    for task, n in [
        ("features", len(cells)),
        ("zero-shot", len(cells)),
        ("generative", len(cells)),
        ("descriptions", len(cells)),
        ("generated", len(PROMPTS) * 16),
    ]:
        cpu_rate, device_rate = n / on_cpu[task][1], n / on_device[task][1]
        print(f"{task:<15} {cpu_rate:>13.1f}  {device_rate:>16.1f}  {device_rate / cpu_rate:>11.2f}x")


if __name__ == "__main__":
    main()
