"""Cell-text data: `datasets` builders for h5ad and TileDB-SOMA sources, instruction examples, and the embedded PBMC
data (the default when no data is named). The Cell Ontology text lives on the model side (`modeling_scmmgpt.ontology`),
with the pipelines that read it."""

from .builders import (
    FEATURES,
    PBMC_LABEL_TO_CELL_ONTOLOGY,
    ScMMGPTCellTextConfig,
    ScMMGPTH5ADBuilder,
    ScMMGPTSomaBuilder,
)
from .instructions import instruction_examples
from .loading import expand_sources, load_cell_text_splits, load_pbmc, load_pbmc_demo


__all__ = [
    "FEATURES",
    "PBMC_LABEL_TO_CELL_ONTOLOGY",
    "ScMMGPTCellTextConfig",
    "ScMMGPTH5ADBuilder",
    "ScMMGPTSomaBuilder",
    "expand_sources",
    "instruction_examples",
    "load_cell_text_splits",
    "load_pbmc",
    "load_pbmc_demo",
]
