"""Instruction examples for the three tasks, built from the same cell records as the descriptions."""

from __future__ import annotations

import random

from modeling_scmmgpt.prompts import ANNOTATE, CELL, DESCRIBE, GENERATE


def instruction_examples(record: dict, seed: int = 0) -> list[dict]:
    """Three instruction examples for one cell record (`cell_id`, `cell_type`, `description`, optional `tissue`).

    Returns dicts with `task`, `prompt`, `response` and `cell_role`: `"input"` when the prompt holds the cell
    (`<cell>`), `"output"` when the response is the cell span the LM must write. The phrasing is picked by a
    generator seeded with `seed` and the cell id, so it is the same on every run and every rank.
    """
    rng = random.Random(f"{seed}:{record['cell_id']}")
    cell_type = record.get("cell_type") or "unknown cell type"
    tissue = f" from {record['tissue']}" if record.get("tissue") else ""
    return [
        {
            "task": "describe",
            "prompt": f"{CELL}\n{rng.choice(DESCRIBE)}",
            "response": record["description"],
            "cell_role": "input",
        },
        {"task": "annotate", "prompt": f"{CELL}\n{rng.choice(ANNOTATE)}", "response": cell_type, "cell_role": "input"},
        {
            "task": "generate",
            "prompt": rng.choice(GENERATE).format(cell_type=cell_type, tissue=tissue),
            "response": CELL,
            "cell_role": "output",
        },
    ]
