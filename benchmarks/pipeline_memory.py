"""Peak RSS and cells/s of `pipeline("cell-feature-extraction")` streaming a backed h5ad of real PBMC cells
(tiled) from 20k to 200k cells, each size in a fresh process. Target: peak RSS flat within 20%.

    python benchmarks/pipeline_memory.py [--sizes 20000 200000] [--batch-size 256]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stream_cells import REPO, peak_rss_mb, write_tiled  # noqa: E402


def build_model(directory: str) -> None:
    """A small random scMMGPT over the census genes PBMC measures (weights do not change memory behaviour)."""
    import torch

    from trainers.data import load_pbmc
    from trainers.default_model import build_model as build_demo_model

    torch.manual_seed(0)
    model, processor = build_demo_model(load_pbmc(), tiny_lm=True)
    processor.feature_extractor.use_raw = False  # the tiled file stores the log-normalised values in X
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def measure(model_dir: str, path: str, batch_size: int) -> dict:
    """Embeddings stream to a .npy file (`output_file`), as a user embedding millions of cells would do; holding
    them in memory would by itself grow with the number of cells."""
    import logging

    logging.disable(logging.WARNING)
    from transformers import pipeline

    import modeling_scmmgpt  # noqa: F401  (registers the pipeline tasks)

    extractor = pipeline("cell-feature-extraction", model=model_dir)
    start = time.perf_counter()
    features = extractor(path, batch_size=batch_size, progress=False, output_file=path + ".features.npy")
    assert np.isfinite(features[-batch_size:]).all()
    return {"cells": len(features), "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.batch_size)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        build_model(model_dir)
        for n in args.sizes:
            path = os.path.join(tmp, f"pbmc_{n}.h5ad")
            write_tiled(path, n)
            out = subprocess.run(
                [sys.executable, __file__, "--child", model_dir, path, "--batch-size", str(args.batch_size)],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": REPO},
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            assert result["cells"] == n
            results.append((n, result))
            os.remove(path)
            os.remove(path + ".features.npy")
            print(
                f"{n:>8} cells: {n / result['seconds']:7.0f} cells/s, peak RSS {result['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    ratio = results[-1][1]["peak_rss_mb"] / results[0][1]["peak_rss_mb"]
    print(f"peak RSS {results[-1][0]:,} / {results[0][0]:,} cells: {ratio:.2f}x (target within 1.20x)")


if __name__ == "__main__":
    main()
