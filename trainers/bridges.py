"""Least-squares starts for the two bridges between cells and the LM, fitted on training cells before stage 3.

Stage 3 on a CPU budget sees each training cell a fraction of a time, too few steps for randomly initialised bridges
to teach a frozen LM to read cells or to write them. Prompt tuning starts its soft prompts from the embeddings of
the class labels (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"); we do the same
per cell, in closed form:

- reading (`multi_modal_projector`): its output layer is fitted so that a cell's tokens land on the LM's input
  embeddings of the cell's label (the annotate answer, its tokens spread over the `num_cell_tokens` positions); a
  cell then reads, at step 0, like the name of the type it most resembles;
- writing (`cell_head`): its output layer is fitted to map the LM's hidden states at the `<cell_i>` positions of a
  cell's generate prompt onto that cell's Q-Former outputs (the regression targets of stage 3); the LM's states
  depend on the type named in the prompt, so generated cells start as the conditional mean of that type.

Both are ridge regressions on the features the first layer of each MLP already computes; training then goes on
from there.
"""

from __future__ import annotations

import torch

from .data.instructions import instruction_examples


@torch.no_grad()
def ridge_fit_(linear: torch.nn.Linear, features: torch.Tensor, targets: torch.Tensor, l2: float = 1e-3) -> float:
    """Sets `linear` (weight and bias) to the ridge solution of `targets ~ features`, in float64.

    Args:
        features (`(n, in_features)`), targets (`(n, out_features)`).
        l2 (`float`): the penalty, relative to the mean diagonal of the centred Gram matrix.
    Returns:
        The fraction of the targets' variance explained (R^2) on the fitted rows.
    """
    x, y = features.double(), targets.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc
    penalty = l2 * gram.diagonal().mean().clamp(min=1e-12)
    weight = torch.linalg.solve(gram + penalty * torch.eye(len(gram), dtype=gram.dtype), xc.T @ yc).T
    linear.weight.copy_(weight.to(linear.weight))
    linear.bias.copy_((y_mean - weight @ x_mean).to(linear.bias))
    residual = yc - xc @ weight.T
    return float(1 - residual.square().sum() / yc.square().sum().clamp(min=1e-12))


def _trained(module):
    """The copy PEFT trains for a `modules_to_save` module, or the module itself."""
    copies = getattr(module, "modules_to_save", None)
    return copies[module.active_adapter] if copies is not None else module


def _spread(tokens: list[int], length: int) -> list[int]:
    """`length` positions over `tokens`, in order (repeating tokens of a short label, skipping some of a long one)."""
    return [tokens[i * len(tokens) // length] for i in range(length)]


@torch.no_grad()
def fit_bridges(model, processor, records: list[dict], seed: int = 0, batch_size: int = 32,
                parts=("projector", "cell_head")) -> dict[str, float]:  # fmt: skip
    """Fits the output layers of `model.model.multi_modal_projector` and `model.cell_head` (see the module docstring),
    or those of `parts`, on `records` (builder examples with `gene_ids`, `values`, `cell_type`, `cell_id`). Returns
    each fit's R^2. `model` may carry PEFT adapters; the bridges' trained copies are the ones fitted."""
    inner, config = model.model, model.config
    was_training = model.training
    model.eval()
    embeddings = inner.get_input_embeddings()
    tokenizer = processor.tokenizer
    queries, labels, states = [], [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        cells = processor.cell_processor(chunk)
        queries.append(inner.cell_tower(cells["gene_ids"], cells["values"], cells["attention_mask"]).query_output.float())
        for record in chunk:
            tokens = tokenizer(str(record["cell_type"]), add_special_tokens=False)["input_ids"] or [tokenizer.unk_token_id]
            labels.append(_spread(tokens, config.num_cell_tokens))
        prompts = [next(e for e in instruction_examples(r, seed) if e["task"] == "generate")["prompt"] for r in chunk]
        texts = [processor.build_prompt(p, with_cell=False, response=processor.cell_span) for p in prompts]
        batch = processor(text=texts, padding=True, padding_side="left", add_special_tokens=False)
        hidden = inner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        spans = inner.get_placeholder_mask(batch["input_ids"])
        states.append(hidden[spans].view(len(chunk), config.num_cell_tokens, -1).float())
    queries, states = torch.cat(queries).flatten(0, 1), torch.cat(states).flatten(0, 1)
    label_embeds = embeddings(torch.tensor(labels)).float().flatten(0, 1)

    projector, head = _trained(inner.multi_modal_projector), _trained(model.cell_head)
    fits = {}
    if "projector" in parts:
        features = projector.act(projector.linear_1(queries.to(projector.linear_1.weight)))
        fits["projector_r2"] = ridge_fit_(projector.linear_2, features, label_embeds)
    if "cell_head" in parts:
        fits["cell_head_r2"] = ridge_fit_(head.linear_2, head.act(head.linear_1(states.to(head.linear_1.weight))), queries)
    model.train(was_training)
    return fits


__all__ = ["fit_bridges", "ridge_fit_"]
