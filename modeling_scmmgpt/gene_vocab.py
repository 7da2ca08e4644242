"""Gene vocabulary: gene symbols and Ensembl IDs to the cell encoder's gene token ids."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from transformers.utils import FEATURE_EXTRACTOR_NAME, PROCESSOR_NAME

from .utils import atomic_write_text, read_json


GENE_VOCAB_NAME = "gene_vocab.json"
SCGPT_SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")


def strip_ensembl_version(gene_id: str) -> str:
    """`ENSG00000141510.17` -> `ENSG00000141510`; other names are returned unchanged."""
    if gene_id.startswith("ENS") and "." in gene_id:
        return gene_id.split(".", 1)[0]
    return gene_id


def looks_like_ensembl(names) -> bool:
    """Whether most of `names` are Ensembl gene IDs (`ENSG...`, any species prefix) rather than symbols."""
    names = list(names)
    return sum(str(n).startswith("ENS") for n in names) > len(names) / 2


@dataclass
class GeneCoverage:
    """How a list of gene names maps to the vocabulary, in both directions.

    `fraction` is the share of the input's genes the model knows; `model_fraction` the share of the model's genes
    (`n_model_genes`, special tokens excluded) the input measures. `unknown` lists the names not in the vocabulary
    (all of them, so nothing is dropped unreported); `duplicated` lists names whose token id was already taken by an
    earlier column (those columns are skipped).
    """

    n_genes: int
    n_known: int
    unknown: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    n_model_genes: int = 0

    @property
    def fraction(self) -> float:
        return self.n_known / max(self.n_genes, 1)

    @property
    def model_fraction(self) -> float:
        return self.n_known / max(self.n_model_genes, 1)

    @property
    def decides_on_model_genes(self) -> bool:
        """`check` decides on the model's genes when its vocabulary is smaller than the input: a 708-gene model
        reading a whole transcriptome knows 2% of the input's genes, but the input may hold most of the model's."""
        return 0 < self.n_model_genes < self.n_genes

    @property
    def deciding_fraction(self) -> float:
        return self.model_fraction if self.decides_on_model_genes else self.fraction

    def __str__(self) -> str:
        text = f"{self.n_known}/{self.n_genes} genes ({self.fraction:.1%}) are in the vocabulary"
        if self.n_model_genes:
            text += f", {self.model_fraction:.1%} of the model's {self.n_model_genes} genes are measured"
        if self.unknown:
            text += f"; {len(self.unknown)} unknown, e.g. {', '.join(self.unknown[:5])}"
        if self.duplicated:
            text += f"; {len(self.duplicated)} map to a gene already used and are skipped, e.g. {', '.join(self.duplicated[:5])}"
        return text

    def check(self, min_fraction: float, source: str) -> None:
        """Raises when the deciding share (`decides_on_model_genes`) is below `min_fraction`, with a hint at the
        likely cause."""
        if self.deciding_fraction >= min_fraction:
            return
        hint = (
            "they look like Ensembl IDs: add aliases with gene_vocab.add_ensembl_ids_from_gencode(...)"
            if looks_like_ensembl(self.unknown)
            else "pass gene_id_column='feature_name' (symbols) or 'feature_id' (Ensembl IDs) if var_names hold "
            "something else"
        )
        if self.decides_on_model_genes:
            what = f"{source} measures {self.n_known} of the model's {self.n_model_genes} genes ({self.model_fraction:.0%})"
        else:
            what = f"{1 - self.fraction:.0%} of genes in {source} are not in the vocabulary (e.g. {', '.join(self.unknown[:5])})"
        raise ValueError(f"{what}; {hint}. Lower min_vocab_coverage (now {min_fraction}) to accept this.")


class GeneVocab:
    """Maps gene names to token ids of the cell encoder.

    Symbols are the primary keys, as in scGPT's `vocab.json`. Ensembl IDs resolve through `ensembl_to_symbol`
    aliases, with or without a version suffix.

    Args:
        gene_to_id (`Mapping[str, int]`): symbol (or special token) to id. Ids must be unique.
        ensembl_to_symbol (`Mapping[str, str]`, *optional*): Ensembl gene ID to symbol.
        pad_token (`str`, defaults to `"<pad>"`), cls_token (`str`, defaults to `"<cls>"`): special tokens, which
            must be in `gene_to_id`.
    """

    def __init__(
        self,
        gene_to_id: Mapping[str, int],
        ensembl_to_symbol: Mapping[str, str] | None = None,
        pad_token: str = "<pad>",
        cls_token: str = "<cls>",
    ):
        self.gene_to_id = dict(gene_to_id)
        ids = list(self.gene_to_id.values())
        if len(set(ids)) != len(ids):
            raise ValueError("GeneVocab ids must be unique; two genes share an id.")
        for token in (pad_token, cls_token):
            if token not in self.gene_to_id:
                raise ValueError(
                    f"Special token {token!r} is not in the vocabulary; add it before building GeneVocab."
                )
        self.pad_token, self.cls_token = pad_token, cls_token
        self.ensembl_to_symbol: dict[str, str] = {}
        if ensembl_to_symbol:
            self.add_ensembl_ids(ensembl_to_symbol)

    # --- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_genes(cls, genes: Iterable[str], special_tokens: Iterable[str] = SCGPT_SPECIAL_TOKENS) -> GeneVocab:
        """Ids in order: the genes, then the special tokens (scGPT's layout)."""
        tokens = list(dict.fromkeys(list(genes) + list(special_tokens)))
        return cls({token: i for i, token in enumerate(tokens)})

    @classmethod
    def from_scgpt_json(
        cls, path: str | os.PathLike, special_tokens: Iterable[str] = SCGPT_SPECIAL_TOKENS
    ) -> GeneVocab:
        """Reads scGPT's `vocab.json` (`{token: id}`). Special tokens it lacks (e.g. `default_census_vocab.json` has
        none) are appended after the largest id, which is how scGPT's released checkpoints number them."""
        with open(path, encoding="utf-8") as f:
            gene_to_id = json.load(f)
        if not isinstance(gene_to_id, dict) or not all(isinstance(v, int) for v in gene_to_id.values()):
            raise ValueError(f"{path} is not a scGPT vocab.json: expected a JSON object of gene name to integer id.")
        next_id = max(gene_to_id.values()) + 1
        for token in special_tokens:
            if token not in gene_to_id:
                gene_to_id[token] = next_id
                next_id += 1
        return cls(gene_to_id)

    def add_ensembl_ids(self, ensembl_to_symbol: Mapping[str, str]) -> int:
        """Adds Ensembl aliases whose symbol is in the vocabulary; returns how many were added."""
        added = 0
        for ensembl_id, symbol in ensembl_to_symbol.items():
            if symbol in self.gene_to_id:
                self.ensembl_to_symbol[strip_ensembl_version(ensembl_id)] = symbol
                added += 1
        return added

    def add_ensembl_ids_from_gencode(self, path: str | os.PathLike) -> int:
        """Adds aliases from a CELLxGENE gencode table (`genes_homo_sapiens.csv.gz`: Ensembl ID, symbol, ...)."""
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            mapping = {row[0]: row[1] for row in csv.reader(f) if len(row) >= 2}
        return self.add_ensembl_ids(mapping)

    # --- lookup ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.gene_to_id)

    def __contains__(self, gene: str) -> bool:
        return self.token_id(gene) is not None

    def __getitem__(self, gene: str) -> int:
        token_id = self.token_id(gene)
        if token_id is None:
            raise KeyError(f"Gene {gene!r} is not in the vocabulary.")
        return token_id

    def token_id(self, gene: str) -> int | None:
        """Id of a symbol or Ensembl ID, or None."""
        token_id = self.gene_to_id.get(gene)
        if token_id is None:
            symbol = self.ensembl_to_symbol.get(strip_ensembl_version(gene))
            token_id = self.gene_to_id.get(symbol) if symbol is not None else None
        return token_id

    def lookup(self, genes: Iterable[str]) -> np.ndarray:
        """Ids for many genes, -1 where a gene is unknown. Shape `(len(genes),)`, int64."""
        return np.array([(-1 if (i := self.token_id(str(g))) is None else i) for g in genes], dtype=np.int64)

    def map_genes(self, gene_names: list[str]) -> tuple[np.ndarray, GeneCoverage]:
        """Token ids of a matrix's columns (-1 for unknown columns and for repeats of an already used gene), and
        the coverage report."""
        ids = self.lookup(gene_names)
        unknown = [g for g, i in zip(gene_names, ids) if i < 0]
        seen, duplicated = set(), []
        for col, token_id in enumerate(ids):
            if token_id < 0:
                continue
            if token_id in seen:
                duplicated.append(gene_names[col])
                ids[col] = -1
            seen.add(int(token_id))
        specials = {self.pad_token, self.cls_token, *SCGPT_SPECIAL_TOKENS}
        n_model_genes = len(self.gene_to_id) - sum(token in self.gene_to_id for token in specials)
        return ids, GeneCoverage(len(gene_names), len(seen), unknown, duplicated, n_model_genes)

    @property
    def pad_token_id(self) -> int:
        return self.gene_to_id[self.pad_token]

    @property
    def cls_token_id(self) -> int:
        return self.gene_to_id[self.cls_token]

    @property
    def id_to_gene(self) -> dict[int, str]:
        """Token id to symbol, built once per vocabulary size (callers index it in loops; the census vocabulary has
        60k genes). Ids are unique and genes are only ever added, so the size tells when to rebuild."""
        cached = getattr(self, "_id_to_gene", None)
        if cached is None or len(cached) != len(self.gene_to_id):
            cached = self._id_to_gene = {i: g for g, i in self.gene_to_id.items()}
        return cached

    @property
    def fingerprint(self) -> str:
        """16 hex digits of the SHA-256 of the (id, gene) pairs in id order: the same for the same genes at the same
        ids, whatever the file layout or the Ensembl aliases added later. A model's config records the fingerprint of
        the vocabulary its gene embeddings were trained with (`ScMMGPTCellConfig.gene_vocab_fingerprint`)."""
        pairs = sorted((i, g) for g, i in self.gene_to_id.items())
        return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]

    @property
    def id_bound(self) -> int:
        """One past the largest token id: the embedding table needs at least this many rows."""
        return max(self.gene_to_id.values()) + 1

    def cell_config_fields(self) -> dict:
        """The `ScMMGPTCellConfig` fields this vocabulary decides: the embedding table's size, the special token ids
        and the fingerprint, so that `ScMMGPTCellConfig(**vocab.cell_config_fields(), d_model=...)` fits it."""
        ids = dict(pad_token_id=self.pad_token_id, cls_token_id=self.cls_token_id)
        return dict(vocab_size=self.id_bound, **ids, gene_vocab_fingerprint=self.fingerprint)

    # --- persistence ----------------------------------------------------------------------------------------------
    _PERSISTED = ("gene_to_id", "ensembl_to_symbol", "pad_token", "cls_token")

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self._PERSISTED}

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, GENE_VOCAB_NAME)
        atomic_write_text(path, json.dumps(self.to_dict()))
        return path

    @classmethod
    def from_dict(cls, data: Mapping) -> GeneVocab:
        """The inverse of `to_dict`."""
        if not isinstance(data, Mapping) or not isinstance(data.get("gene_to_id"), Mapping):
            raise ValueError(
                "The gene vocabulary has no 'gene_to_id' mapping of gene to id; save it again with "
                "GeneVocab.save_pretrained or the processor's save_pretrained."
            )
        return cls(
            data["gene_to_id"],
            ensembl_to_symbol=data.get("ensembl_to_symbol"),
            pad_token=data.get("pad_token", "<pad>"),
            cls_token=data.get("cls_token", "<cls>"),
        )

    @classmethod
    def from_pretrained(cls, directory_or_file: str | os.PathLike) -> GeneVocab:
        """Loads a `gene_vocab.json` or a scGPT `vocab.json` (the file, or a folder holding it), or the vocabulary
        inside a saved cell processor's config (a model folder: `preprocessor_config.json`, or the
        `feature_extractor` entry of `processor_config.json`)."""
        path = str(directory_or_file)
        if os.path.isdir(path):
            names = (GENE_VOCAB_NAME, "vocab.json", FEATURE_EXTRACTOR_NAME, PROCESSOR_NAME)
            candidates = [os.path.join(path, name) for name in names]
            path = next((p for p in candidates if os.path.isfile(p)), candidates[0])
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No gene vocabulary at {path}: expected {GENE_VOCAB_NAME}, scGPT's vocab.json or a saved scMMGPT "
                "processor's config."
            )
        data = read_json(path)
        if os.path.basename(path) in (FEATURE_EXTRACTOR_NAME, PROCESSOR_NAME):
            data = data.get("feature_extractor", data)
            if not isinstance(data.get("gene_vocab"), dict):
                raise FileNotFoundError(f"No gene vocabulary in {path} (nor a {GENE_VOCAB_NAME} beside it).")
            return cls.from_dict(data["gene_vocab"])
        if "gene_to_id" not in data:
            return cls.from_scgpt_json(path)
        return cls.from_dict(data)

    def __eq__(self, other) -> bool:
        return isinstance(other, GeneVocab) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"GeneVocab({len(self)} tokens, {len(self.ensembl_to_symbol)} Ensembl aliases)"


__all__ = ["GeneCoverage", "GeneVocab", "looks_like_ensembl", "strip_ensembl_version"]
