"""Cell-text data: `datasets` builders for h5ad and TileDB-SOMA sources, Cell Ontology text, instruction examples,
and the embedded PBMC demo."""

from .builders import FEATURES, ScMMGPTCellTextConfig, ScMMGPTH5ADBuilder, ScMMGPTSomaBuilder
from .instructions import instruction_examples
from .ontology import CellOntology, OntologyReport
from .pbmc import PBMC_LABEL_TO_CELL_ONTOLOGY, load_pbmc_demo

__all__ = [
    "FEATURES",
    "PBMC_LABEL_TO_CELL_ONTOLOGY",
    "CellOntology",
    "OntologyReport",
    "ScMMGPTCellTextConfig",
    "ScMMGPTH5ADBuilder",
    "ScMMGPTSomaBuilder",
    "instruction_examples",
    "load_pbmc_demo",
]
