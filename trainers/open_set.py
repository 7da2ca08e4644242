"""The open-set reference, fitted after each stage: what zero-shot annotation needs to name cell types the model never
trained on.

Contrastive heads learn their training texts. A cell of a type outside them scores highest with the trained type it
most resembles, however well the new type's definition would fit: on the SmolLM2 demo with B and NK cells held out of
all training, every one of their 19 test cells went to a trained type (accuracy 0, chance 0.1), although among the two
new definitions alone the right one won for 12 of them. So the model keeps a reference (`ScMMGPTModel.
set_open_set_reference`): the cell types it trained on and the contrastive features of up to `reference_cells`
training cells. A cell whose mean similarity to its nearest reference cells is below the 5% quantile of validation
cells (of the trained types) is taken for a new type, and zero-shot annotation names it among the candidates the
model never trained on (Sun et al. 2022, "Out-of-Distribution Detection with Deep Nearest Neighbors"; Chao et al.
2016 on generalised zero-shot learning, where seen classes win unless calibrated).
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import torch

from modeling_scmmgpt.processing_scmmgpt import cell_inputs


logger = logging.getLogger(__name__)


def _records(split, limit: int) -> list[dict]:
    """The first `limit` examples of a map-style or streamed split, as dicts."""
    if hasattr(split, "select"):
        return list(split.select(range(min(limit, len(split)))))
    return list(itertools.islice(iter(split), limit))


@torch.no_grad()
def _cell_features(model, processor, records: list[dict], batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    features = []
    for start in range(0, len(records), batch_size):
        cells = processor.feature_extractor(records[start : start + batch_size]).to(device)
        features.append(model.get_cell_features(**cell_inputs(cells)).float())
    return torch.cat(features)


def contrastive_features_trained(model) -> bool:
    """Whether any weight behind the contrastive cell or text features (the cell path, the text path, their norms
    and projections) was trainable: only then can a stage's training have moved the features a reference holds."""
    from modeling_scmmgpt.modeling_scmmgpt import ScMMGPTCellTower

    tower = next(m for m in model.modules() if isinstance(m, ScMMGPTCellTower))
    parts = [*tower.cell_path(), *tower.text_path_parameters()]
    parts += [tower.cell_projection, tower.text_projection, tower.cell_feature_norm, tower.text_feature_norm]
    return any(
        p.requires_grad
        for part in parts
        for p in ([part] if isinstance(part, torch.nn.Parameter) else part.parameters())
    )


def fit_open_set_reference_(
    model, processor, train, validation, reference_cells: int = 2048, quantile: float = 0.05, batch_size: int = 64
) -> dict:
    """Sets `model`'s open-set reference from `train` (its types, and the features of its first `reference_cells`
    cells) and `validation` (the threshold: the `quantile` of its cells' similarity to the reference; cells of types
    not in `train` are left out of it). Both are builder splits, map-style or streamed (a stream's types are those of
    its first `reference_cells` cells). `model` is an scMMGPT model, possibly PEFT-wrapped. Returns what was fitted."""
    from modeling_scmmgpt import ScMMGPTModel

    inner = next(m for m in model.modules() if isinstance(m, ScMMGPTModel))
    reference = _records(train, reference_cells)
    if not reference:
        raise ValueError("The open-set reference needs training cells; the training split is empty.")
    if hasattr(train, "select"):
        types, ids = train["cell_type"], train["cell_type_ontology_term_id"]
    else:
        types, ids = [r["cell_type"] for r in reference], [r["cell_type_ontology_term_id"] for r in reference]
    labels = {label for label in [*types, *ids] if label}
    held = [r for r in _records(validation, reference_cells) if r["cell_type"] in set(types)]
    if not held:
        raise ValueError("The open-set threshold needs validation cells of the training types; there are none.")
    was_training = model.training
    model.eval()
    try:
        features = _cell_features(model, processor, reference, batch_size)
        inner.set_open_set_reference(sorted(labels), features, threshold=0.0)
        similarity = inner.open_set_similarity(_cell_features(model, processor, held, batch_size))
    finally:
        model.train(was_training)
    threshold = float(np.quantile(similarity.cpu().numpy(), quantile))
    inner.config.open_set_threshold = threshold
    return {
        "open_set_reference_cells": len(reference),
        "open_set_validation_cells": len(held),
        "open_set_threshold": threshold,
        "open_set_labels": len(labels),
    }


__all__ = ["contrastive_features_trained", "fit_open_set_reference_"]
