"""Cell Ontology text, offline, from the `cellxgene-ontology-guide` package data."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache


TEXT_FIELDS = ("cell_type", "cell_type_ontology_term_id", "tissue", "disease", "sex", "development_stage")


def _normalise(label: str) -> str:
    return re.sub(r"[\s_\-]+", " ", label.strip().lower())


@dataclass
class OntologyReport:
    """How labels were resolved: by Cell Ontology id, by label, by synonym, or not at all (label-only text)."""

    by_id: int = 0
    by_label: int = 0
    by_synonym: int = 0
    unmatched: Counter = field(default_factory=Counter)

    def add(self, other: OntologyReport, times: int = 1) -> None:
        """Adds `other`'s counts, each `times` over (one resolution standing for `times` cells)."""
        self.by_id += other.by_id * times
        self.by_label += other.by_label * times
        self.by_synonym += other.by_synonym * times
        for label, n in other.unmatched.items():
            self.unmatched[label] += n * times

    def __str__(self) -> str:
        text = f"Cell Ontology: {self.by_id} by id, {self.by_label} by label, {self.by_synonym} by synonym"
        if self.unmatched:
            examples = ", ".join(f"{label!r} x{n}" for label, n in self.unmatched.most_common(5))
            text += f"; {sum(self.unmatched.values())} unmatched, kept with label-only text ({examples})"
        return text


class CellOntology:
    """Labels, definitions, synonyms and ancestors of Cell Ontology terms.

    Args:
        terms (`dict`): CL id to `{"label", "description", "synonyms", "ancestors": {id: distance}}`, the layout of
            `cellxgene-ontology-guide`'s `CL-ontology-*.json.zst`.
    """

    def __init__(self, terms: dict[str, dict]):
        self.terms = terms
        self._by_label, self._by_synonym = {}, {}
        for term_id, term in terms.items():
            if term.get("deprecated"):
                continue
            self._by_label.setdefault(_normalise(term["label"]), term_id)
            for synonym in term.get("synonyms", []):
                self._by_synonym.setdefault(_normalise(synonym), term_id)

    @classmethod
    def load(cls, path: str | None = None) -> CellOntology:
        """The newest CL release shipped in `cellxgene-ontology-guide` (or a given `.json.zst`/`.json` file)."""
        return _load_cached(path or _newest_cl_file())

    def __contains__(self, term_id: str) -> bool:
        return term_id in self.terms

    def labels(self) -> list[str]:
        """The labels of the current (not deprecated) terms, sorted: the names a user may pick from."""
        return sorted({term["label"] for term in self.terms.values() if not term.get("deprecated")})

    def label(self, term_id: str) -> str:
        return self.terms[term_id]["label"]

    def definition(self, term_id: str) -> str | None:
        return self.terms[term_id].get("description")

    def parent(self, term_id: str) -> str | None:
        """The nearest non-root ancestor (distance 1; ties broken by id for determinism)."""
        ancestors = self.terms.get(term_id, {}).get("ancestors", {})
        direct = sorted(a for a, d in ancestors.items() if d == 1 and a in self.terms and a != "CL:0000000")
        return direct[0] if direct else None

    def resolve(self, label: str | None, term_id: str | None, report: OntologyReport | None = None) -> str | None:
        """A CL id for a record: its own id when valid, else its label or a synonym, else None (counted)."""
        report = report if report is not None else OntologyReport()
        if term_id and term_id in self.terms:
            report.by_id += 1
            return term_id
        key = _normalise(label or "")
        if key in self._by_label:
            report.by_label += 1
            return self._by_label[key]
        if key in self._by_synonym:
            report.by_synonym += 1
            return self._by_synonym[key]
        report.unmatched[label or "<no label>"] += 1
        return None

    def describe(self, record: dict, template: str = "paper") -> str:
        """Text for a cell record (keys from `TEXT_FIELDS`; `cell_type_ontology_term_id` already resolved).

        `"paper"`: `cell type: {label}. {definition}` (scMMGPT's format). `"rich"` adds the parent type and the
        tissue, disease, sex and development stage that are known.
        """
        term_id = record.get("cell_type_ontology_term_id")
        label = self.label(term_id) if term_id in self.terms else record.get("cell_type") or "unknown"
        text = f"cell type: {label}."
        definition = self.definition(term_id) if term_id in self.terms else None
        if definition:
            text += f" {definition}"
        if template == "paper":
            return text
        if template != "rich":
            raise ValueError(f"Unknown description template {template!r}; use 'paper' or 'rich'.")
        parent = self.parent(term_id) if term_id in self.terms else None
        if parent:
            text += f" It is a kind of {self.label(parent)}."
        context = []
        if _known(record.get("tissue")):
            context.append(f"from {record['tissue']}")
        donor = " ".join(v for v in (record.get("development_stage"), record.get("sex")) if _known(v))
        if donor:
            context.append(f"of a {donor} donor")
        if _known(record.get("disease")):
            context.append("with no disease" if record["disease"] == "normal" else f"with {record['disease']}")
        if context:
            text += " This cell is " + ", ".join(context) + "."
        return text


def _known(value) -> bool:
    return isinstance(value, str) and value not in ("", "unknown", "na", "NA")


def _newest_cl_file() -> str:
    spec = importlib.util.find_spec("cellxgene_ontology_guide")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("Cell Ontology data not found: pip install cellxgene-ontology-guide")
    directory = os.path.join(list(spec.submodule_search_locations)[0], "data")
    files = sorted(glob.glob(os.path.join(directory, "CL-ontology-*.json.zst")))
    if not files:
        raise FileNotFoundError(f"No CL-ontology-*.json.zst in {directory}.")
    return files[-1]


@lru_cache(maxsize=4)
def _load_cached(path: str) -> CellOntology:
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().decompress(raw, max_output_size=1 << 30)
    return CellOntology(json.loads(raw))
