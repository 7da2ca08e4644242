"""The instruction phrasings the model is tuned on and the pipelines ask with: one place for both, so a pipeline's
default prompt is always one the model has seen."""

from .processing_scmmgpt import CELL_START_TOKEN as CELL


DESCRIBE = (
    "Describe this cell.",
    "What can you tell me about this cell?",
    "Write a short description of this cell.",
    "Give a description of the cell shown.",
)
ANNOTATE = (
    "Which cell type is this?",
    "What type of cell is this?",
    "Name the cell type of this cell.",
    "Identify the cell type.",
)
GENERATE = (
    "Generate a cell of type {cell_type}{tissue}.",
    "Create a {cell_type}{tissue}.",
    "Produce the expression profile of a {cell_type}{tissue}.",
    "Write a cell that is a {cell_type}{tissue}.",
)

__all__ = ["ANNOTATE", "CELL", "DESCRIBE", "GENERATE"]
