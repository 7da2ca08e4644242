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


def generation_prompts(cell_types: list[str], cells_per_type: int, tissue: str | dict[str, str] = "") -> list[str]:
    """`cells_per_type` generate prompts per type, type by type, cycling through the phrasings (so each type is asked
    the same ways). `tissue` is a suffix such as `" from blood"`, or a mapping from type to its suffix."""
    return [
        GENERATE[k % len(GENERATE)].format(
            cell_type=cell_type, tissue=tissue.get(cell_type, "") if isinstance(tissue, dict) else tissue
        )
        for cell_type in cell_types
        for k in range(cells_per_type)
    ]


__all__ = ["ANNOTATE", "CELL", "DESCRIBE", "GENERATE", "generation_prompts"]
