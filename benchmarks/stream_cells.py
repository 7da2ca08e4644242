"""Cells/s streamed from a backed h5ad through `ScMMGPTH5ADBuilder` and tokenised by `ScMMGPTCellProcessor`, and
peak RSS, as the input grows (real PBMC cells tiled).

    python benchmarks/stream_cells.py [--sizes 10000 50000 200000] [--batch-size 256] [--no-scgpt]

Each size runs in a fresh subprocess so that its peak RSS is its own. Side by side, on the same file, scGPT's own
data path as its `embed_data` runs it (scgpt/tasks/cell_emb.py): the whole matrix read into memory and densified,
then per cell its `Dataset.__getitem__` (nonzero genes, `<cls>` first) and per batch its `DataCollator` (per-cell
binning, padding; max_length 1,200), in one process (`num_workers=0`, as ours), in its own subprocess. Its rate
counts only the tokenisation, after the read; ours counts the read too, since ours streams. Targets (issue 17): at least 12,000 cells/s, and a peak
RSS that does not grow with the number of cells.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_tiled(path: str, n_cells: int) -> None:
    """PBMC's 700 real cells (log-normalised `.raw`), repeated to `n_cells`, with unique cell ids."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from modeling_scmmgpt.resources import pbmc68k_reduced_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pbmc = ad.read_h5ad(pbmc68k_reduced_path())
    reps = -(-n_cells // pbmc.n_obs)
    matrix = sp.vstack([pbmc.raw.X] * reps, format="csr")[:n_cells]
    labels = np.tile(pbmc.obs["bulk_labels"].astype(str).to_numpy(), reps)[:n_cells]
    obs = pd.DataFrame({"cell_type": labels}, index=[f"cell{i}" for i in range(n_cells)])
    ad.AnnData(matrix, obs=obs, var=pd.DataFrame(index=pbmc.raw.var_names)).write_h5ad(path)


def measure(path: str, batch_size: int) -> dict:
    """Runs in the child: stream the whole file, tokenise every batch, report cells/s and peak RSS."""
    import logging

    logging.disable(logging.WARNING)
    from modeling_scmmgpt import GeneVocab, ScMMGPTCellProcessor
    from modeling_scmmgpt.resources import census_vocab_path
    from trainers.data import ScMMGPTH5ADBuilder

    with tempfile.TemporaryDirectory() as cache:
        builder = ScMMGPTH5ADBuilder(cache_dir=cache, h5ad_files=[path])
        processor = ScMMGPTCellProcessor(GeneVocab.from_scgpt_json(census_vocab_path()), max_genes=1200)
        # Arrow batches reach the processor without a detour through Python lists.
        stream = builder.as_streaming_dataset("train").select_columns(["gene_ids", "values"]).with_format("arrow")
        cells, start = 0, time.perf_counter()
        for batch in stream.iter(batch_size=batch_size):
            cells += len(processor(batch)["cell_gene_ids"])
        seconds = time.perf_counter() - start
    return {"cells": cells, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def measure_scgpt(path: str, batch_size: int) -> dict:
    """Runs in the child: scGPT's own in-memory data path on the same cells (see the module docstring)."""
    import importlib
    import importlib.util
    import logging
    import types

    import anndata as ad
    import numpy as np
    import torch

    from modeling_scmmgpt import GeneVocab
    from modeling_scmmgpt.resources import census_vocab_path

    vocab = GeneVocab.from_scgpt_json(census_vocab_path())  # before the stand-in below hides the package's files
    # scgpt's __init__ needs torchtext, whose binary no longer loads on current torch: load its data_collator and
    # preprocess modules under a stand-in package that provides only the `logger` they import.
    spec = importlib.util.find_spec("scgpt")
    package = types.ModuleType("scgpt")
    package.__path__, package.logger = list(spec.submodule_search_locations), logging.getLogger("scgpt")
    sys.modules["scgpt"] = package
    collator_module = importlib.import_module("scgpt.data_collator")

    start = time.perf_counter()
    adata = ad.read_h5ad(path)
    ids, _ = vocab.map_genes(list(adata.var_names))
    adata = adata[:, ids >= 0]  # scGPT keeps the genes in its vocabulary
    gene_ids = ids[ids >= 0]
    count_matrix = adata.X if isinstance(adata.X, np.ndarray) else adata.X.toarray()
    read_seconds = time.perf_counter() - start

    def item(idx):  # scGPT's cell_emb.Dataset.__getitem__
        row = count_matrix[idx]
        nonzero_idx = np.nonzero(row)[0]
        genes = np.insert(gene_ids[nonzero_idx], 0, vocab.cls_token_id)
        values = np.insert(row[nonzero_idx], 0, -2)
        return {"id": idx, "genes": torch.from_numpy(genes).long(), "expressions": torch.from_numpy(values).float()}

    collator = collator_module.DataCollator(
        do_padding=True, pad_token_id=vocab.pad_token_id, pad_value=-2, do_mlm=False, do_binning=True,
        max_length=1200, sampling=True, keep_first_n_tokens=1,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        range(len(count_matrix)), batch_size=batch_size, collate_fn=lambda idx: collator([item(i) for i in idx])
    )
    cells, start = 0, time.perf_counter()
    for batch in loader:
        cells += len(batch["gene"])
    seconds = time.perf_counter() - start
    return {"cells": cells, "seconds": seconds, "read_seconds": read_seconds, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's own peak RSS. VmHWM belongs to the address space, which exec replaces; getrusage's
    ru_maxrss is not used because Linux carries it over from the parent that forked us."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(arguments: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *arguments],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--no-scgpt", action="store_true", help="skip scGPT's own data path")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-scgpt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch_size)))
        return
    if args.child_scgpt:
        print(json.dumps(measure_scgpt(args.child_scgpt, args.batch_size)))
        return

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            path = os.path.join(tmp, f"pbmc_{n}.h5ad")
            write_tiled(path, n)
            result = _child(["--child", path, "--batch-size", str(args.batch_size)])
            assert result["cells"] == n, f"streamed {result['cells']} of {n} cells"
            line = f"{n:>8} cells: ours {n / result['seconds']:8.0f} cells/s, peak RSS {result['peak_rss_mb']:.0f} MB"
            if not args.no_scgpt:
                theirs = _child(["--child-scgpt", path, "--batch-size", str(args.batch_size)])
                assert theirs["cells"] == n, f"scGPT's path gave {theirs['cells']} of {n} cells"
                rate = n / theirs["seconds"]
                line += (
                    f"; scGPT's data path {rate:8.0f} cells/s after a {theirs['read_seconds']:.1f} s read, peak RSS "
                    f"{theirs['peak_rss_mb']:.0f} MB; ours / scGPT {n / result['seconds'] / rate:.2f}x"
                )
            results.append((n, result))
            os.remove(path)
            print(line, flush=True)
    first, last = results[0][1], results[-1][1]
    print(
        f"peak RSS {results[-1][0]:,} / {results[0][0]:,} cells: {last['peak_rss_mb'] / first['peak_rss_mb']:.2f}x "
        f"(flat memory is 1.0x); slowest rate {min(n / r['seconds'] for n, r in results):.0f} cells/s "
        "(target >= 12,000)"
    )


if __name__ == "__main__":
    main()
