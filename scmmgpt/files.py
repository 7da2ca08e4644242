"""Reading a user's `.h5ad` file for the apps (CLI and web app): one clear error for a file that is not one, and the
cell count without loading the matrix."""

from __future__ import annotations

import os
import warnings


def read_h5ad(path: str, backed: bool = False, name: str | None = None):
    """The AnnData in `path` (opened read-only when `backed`). Raises `ValueError` naming the file (as `name`, e.g.
    an upload's own name, when given) when it is missing, empty, truncated or not an AnnData file."""
    import anndata as ad

    name = name or path
    if not os.path.isfile(path):
        raise ValueError(f"{name}: no such file.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{name} is empty (0 bytes): not a readable .h5ad file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ad.read_h5ad(path, backed="r" if backed else None)
    except (OSError, KeyError, ValueError, TypeError) as error:
        # h5py says "file signature not found" or "truncated file"; anndata a KeyError for an HDF5 that is no AnnData
        raise ValueError(f"{name} is not a readable .h5ad file ({error}).") from None


def count_cells(path: str) -> int:
    """Cells in an `.h5ad` file, from its matrix's shape (nothing loaded); 0 when it cannot tell (the read that
    follows reports the file's problem)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            matrix = f["X"] if "X" in f else f["raw/X"]
            return int(matrix.shape[0] if isinstance(matrix, h5py.Dataset) else matrix.attrs["shape"][0])
    except (OSError, KeyError, TypeError):
        return 0


__all__ = ["count_cells", "read_h5ad"]
