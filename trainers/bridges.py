"""Closed-form starts for the bridges between cells and the LM, fitted on training cells before stage 3.

Stage 3 on a CPU budget sees each training cell a fraction of a time, too few steps for randomly initialised bridges
to teach a frozen LM to read cells or to write them. Prompt tuning starts its soft prompts from the embeddings of
the class labels (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"); we do the same
per cell, in closed form:

- reading, `"projector"`: the output layer of `multi_modal_projector` is fitted so that a cell's tokens land on the
  LM's input embeddings of the cell's label (the annotate answer, its tokens spread over the `num_cell_tokens`
  positions). A least-squares map blurs the labels: it regresses every cell towards the mean of all names (R^2 0.14
  on the SmolLM2 demo, and a nearest-label reading of 0.27 on test cells, where a logistic regression on the same
  query outputs is right for 0.79);
- reading, `"codebook"`: instead, a cell codebook (`ScMMGPTModel.set_cell_codebook`) with one entry per training
  label, started from the label's token embeddings (or the label's and its Cell Ontology name's,
  `codebook_entries="label_and_name"`), mixed by a logistic regression on the query outputs; the
  projector's output layer starts at zero. A cell then reads, at step 0, like the name of the type it most
  resembles, with the regression's confidence. On the SmolLM2 demo this took generative annotation from about 0.3
  to about 0.8 (docs/recipe.md);
- writing, `"cell_head"`: the output layer of `cell_head` is fitted to map the LM's hidden states at the `<cell_i>`
  positions of a cell's generate prompt onto that cell's Q-Former outputs (the regression targets of stage 3); the
  LM's states depend on the type named in the prompt, so generated cells start as the conditional mean of that type.

Training then goes on from there.

Stage 2 has one closed-form start too, `fit_expression_readout_`: the expression decoder's per-gene readout of the
mean cell token (`ScMMGPTConfig.gene_expression_readout`) is the ridge fit of the training cells' expression. With the
demo's 120 steps from zero, expression decoded from real test cells' tokens had type means correlating about 0.53 with
the real ones; a ridge readout of the same tokens reaches 0.89.
"""

from __future__ import annotations

import numpy as np
import torch

from modeling_scmmgpt.processing_scmmgpt import cell_inputs

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


def _spread(tokens: list[int], length: int, keep_ends: bool = False) -> list[int]:
    """`length` positions over `tokens`, in order (repeating tokens of a short label, skipping some of a long one).
    `keep_ends` keeps a long label's first and last tokens, spacing the rest evenly between them: at the four
    positions of half an entry, "CD56+ NK" keeps its "NK" (else "CD", "5", "6", "+")."""
    n = len(tokens)
    if keep_ends and 1 < length < n:
        return [tokens[round(i * (n - 1) / (length - 1))] for i in range(length)]
    return [tokens[i * n // length] for i in range(length)]


BRIDGE_PARTS = ("projector", "codebook", "cell_head")
# What a codebook entry starts from: the label's tokens, or the label's tokens on the first half of the cell
# positions and its Cell Ontology name's on the second (the name the descriptions use, e.g. "CD19+ B" / "B cell").
CODEBOOK_ENTRIES = ("label", "label_and_name")


@torch.no_grad()
def fit_bridges(
    model,
    processor,
    records: list[dict],
    seed: int = 0,
    batch_size: int = 32,
    parts=("projector", "cell_head"),
    codebook_c: float = 1.0,
    codebook_confidence: float | None = None,
    codebook_entries: str = "label",
) -> dict[str, float]:
    """Fits `parts` of the bridges ([`BRIDGE_PARTS`]; see the module docstring) on `records`
    (builder examples with `gene_ids`, `values`, `cell_type`, `cell_id`). Returns each fit's R^2 (the codebook: its
    classifier's accuracy on `records`, its `C` and its logit scale; `codebook_c` 0 chooses `C` by cross-validation,
    `codebook_confidence` sets the scale and `codebook_entries` the entries' text, see [`_fit_codebook`]). `model`
    may carry PEFT adapters; the bridges' trained copies are fitted."""
    if codebook_entries not in CODEBOOK_ENTRIES:
        raise ValueError(f"Unknown codebook entries {codebook_entries!r}; use one of {', '.join(CODEBOOK_ENTRIES)}.")
    if codebook_entries == "label_and_name" and model.config.num_cell_tokens < 2:
        raise ValueError("codebook entries 'label_and_name' need num_cell_tokens >= 2 (a half for each); use 'label'.")
    unknown = set(parts) - set(BRIDGE_PARTS)
    if unknown:
        raise ValueError(f"Unknown bridge parts {sorted(unknown)}; use {', '.join(map(repr, BRIDGE_PARTS))}.")
    inner = model.model
    was_training = model.training
    model.eval()
    queries = torch.cat(
        [_query_outputs(inner, processor, records[i : i + batch_size]) for i in range(0, len(records), batch_size)]
    )
    projector, head = _trained(inner.multi_modal_projector), _trained(model.cell_head)
    fits = {}
    if "projector" in parts:
        labels = _label_embeddings(model, processor, [r["cell_type"] for r in records])
        features = projector.act(projector.linear_1(queries.flatten(0, 1).to(projector.linear_1.weight)))
        fits["projector_r2"] = ridge_fit_(projector.linear_2, features, labels.flatten(0, 1))
    if "codebook" in parts:
        fits["codebook_accuracy"], fits["codebook_c"], fits["codebook_scale"] = _fit_codebook(
            model,
            processor,
            queries,
            [r["cell_type"] for r in records],
            codebook_c,
            codebook_confidence,
            _ontology_names(records) if codebook_entries == "label_and_name" else None,
        )
        projector.linear_2.weight.zero_()
        projector.linear_2.bias.zero_()
    if "cell_head" in parts:
        states = _generate_prompt_states(model, processor, records, seed, batch_size)
        features = head.act(head.linear_1(states.flatten(0, 1).to(head.linear_1.weight)))
        fits["cell_head_r2"] = ridge_fit_(head.linear_2, features, queries.flatten(0, 1))
    model.train(was_training)
    return fits


def _query_outputs(inner, processor, records: list[dict]) -> torch.Tensor:
    """`(len(records), num_cell_tokens, qformer_hidden_size)` float query outputs."""
    cells = processor.feature_extractor(records)
    return inner.cell_tower(**cell_inputs(cells)).query_output.float()


def _label_embeddings(model, processor, labels: list[str], names: list[str] | None = None) -> torch.Tensor:
    """`(len(labels), num_cell_tokens, lm_hidden_size)`: the LM's input embeddings of each label's tokens, spread over
    the cell positions; with `names`, the label's over the first half and its name's over the second, each keeping
    its first and last tokens (see [`_spread`])."""
    tokenizer = processor.tokenizer

    def ids(text) -> list[int]:
        return tokenizer(str(text), add_special_tokens=False)["input_ids"] or [tokenizer.unk_token_id]

    length = model.config.num_cell_tokens
    if names is None:
        tokens = [_spread(ids(label), length) for label in labels]
    else:
        half = length // 2
        tokens = [
            _spread(ids(label), half, keep_ends=True) + _spread(ids(name), length - half, keep_ends=True)
            for label, name in zip(labels, names)
        ]
    return model.model.get_input_embeddings()(torch.tensor(tokens)).float()


def _ontology_names(records: list[dict]) -> dict[str, str]:
    """Each record label's Cell Ontology name (from its resolved `cell_type_ontology_term_id`; the first record's,
    should one label carry several terms), or the label itself where the term is missing or unknown."""
    from modeling_scmmgpt.ontology import CellOntology

    ontology, names = CellOntology.load(), {}
    for record in records:
        label, term = str(record["cell_type"]), record.get("cell_type_ontology_term_id")
        names.setdefault(label, ontology.label(term) if term in ontology.terms else label)
    return names


def _generate_prompt_states(model, processor, records: list[dict], seed: int, batch_size: int) -> torch.Tensor:
    """`(len(records), num_cell_tokens, lm_hidden_size)`: the LM's hidden states at the `<cell_i>` positions of each
    record's generate prompt (answered with the cell span). The states depend on the prompt text only (a handful of
    phrasings per type), so each distinct prompt runs through the LM once: the fit can then use every training cell
    for the price of a few dozen LM passes."""
    inner = model.model
    prompts = [next(e for e in instruction_examples(r, seed) if e["task"] == "generate")["prompt"] for r in records]
    distinct = list(dict.fromkeys(prompts))
    states = []
    for start in range(0, len(distinct), batch_size):
        texts = [
            processor.build_prompt(p, with_cell=False, response=processor.cell_span)
            for p in distinct[start : start + batch_size]
        ]
        batch = processor(text=texts, padding=True, padding_side="left", add_special_tokens=False)
        # Left padding: positions count real tokens only, as in `generate_cells`, so the states do not depend on
        # which other prompts share the batch.
        positions = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        hidden = inner(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions
        ).last_hidden_state
        states.append(
            hidden[inner.get_placeholder_mask(batch["input_ids"])].view(len(texts), model.config.num_cell_tokens, -1)
        )
    index = {prompt: i for i, prompt in enumerate(distinct)}
    return torch.cat(states).float()[torch.tensor([index[p] for p in prompts])]


def _fit_codebook(
    model,
    processor,
    queries: torch.Tensor,
    labels: list[str],
    c: float = 1.0,
    confidence: float | None = None,
    entry_names: dict[str, str] | None = None,
) -> tuple[float, float, float]:
    """Sets the model's cell codebook: entries from the labels' token embeddings (with `entry_names`, a label's and
    its name's, see [`_label_embeddings`]), the classifier from a logistic regression on the standardised, flattened
    query outputs (the standardisation folded into its weights), with inverse L2 strength `c` (0: chosen by 5-fold
    cross-validation).

    `confidence` decouples how sharp the mixture is from how strongly the regression is regularised: the logits are
    multiplied by the one factor that makes the fitting cells' mean top probability `confidence`, which leaves every
    cell's most likely label as it is. The regression generalises best strongly regularised, but then its mixtures
    are soft (mean top probability about 0.75 on the demo's cells at cross-validation's `C`), and the LM reads a
    blend of label embeddings less well than a near one-hot one. Returns the regression's accuracy on these cells,
    its `C` and the logit scale (1 without `confidence`)."""
    from inspect import signature

    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    names = list(map(str, labels))
    if len(set(names)) < 2:
        raise ValueError(
            f"bridge_init='label_codebook' needs at least two cell types in the training cells; got {sorted(set(names))}."
        )
    features = queries.flatten(1).double()
    mean, scale = features.mean(0), features.std(0).clamp(min=1e-6)
    standardised = ((features - mean) / scale).numpy()
    if c == 0:  # the grid's C with the best held-out accuracy, refitted on all cells
        folds = min(5, min(names.count(n) for n in set(names)))
        if folds < 2:
            raise ValueError("bridge_codebook_c 0 cross-validates: every cell type needs at least 2 fitting cells.")
        # Plain L2 and the new fitted attributes, said explicitly where scikit-learn has the options (1.8 and later;
        # its defaults change in 1.10 and it warns until then).
        options = dict(l1_ratios=(0.0,), use_legacy_attributes=False)
        options = {
            name: value for name, value in options.items() if name in signature(LogisticRegressionCV).parameters
        }
        grid = LogisticRegressionCV(Cs=np.logspace(-4, 2, 7), cv=folds, scoring="accuracy", max_iter=2000, **options)
        regression = grid.fit(standardised, names)
        c = float(np.ravel(regression.C_)[0])  # an array before scikit-learn 1.10, a float after
    else:
        regression = LogisticRegression(C=c, max_iter=2000).fit(standardised, names)
    coef = torch.from_numpy(regression.coef_).double()
    bias = torch.from_numpy(regression.intercept_).double()
    if (
        len(regression.classes_) == 2
    ):  # binary: one logit for the second class; the softmax of (0, z) is the same sigmoid
        coef, bias = torch.cat([torch.zeros_like(coef), coef]), torch.cat([torch.zeros_like(bias), bias])
    logit_scale = 1.0
    if confidence is not None:
        logit_scale = _scale_for_confidence(torch.from_numpy(standardised) @ coef.T + bias, confidence)
        coef, bias = coef * logit_scale, bias * logit_scale
    weight = coef / scale
    classes = list(regression.classes_)
    model.model.set_cell_codebook(
        classes,
        weight,
        bias - weight @ mean,
        _label_embeddings(
            model, processor, classes, None if entry_names is None else [entry_names[k] for k in classes]
        ),
    )
    return float(regression.score(standardised, names)), c, logit_scale


def _scale_for_confidence(logits: torch.Tensor, confidence: float, steps: int = 60) -> float:
    """The factor `t > 0` for which `softmax(t * logits)`'s top probability averages `confidence` over the rows of
    `logits` `(num_cells, num_labels)`. Each row's top probability rises with `t` (from 1/num_labels towards 1), so
    bisection on log t finds it; a confidence out of reach clips to the bracket's end (`t` from 1e-4 to 1e4)."""
    low, high = -4 * np.log(10), 4 * np.log(10)
    for _ in range(steps):
        middle = (low + high) / 2
        if (logits * np.exp(middle)).softmax(-1).amax(-1).mean() < confidence:
            low = middle
        else:
            high = middle
    return float(np.exp((low + high) / 2))


@torch.no_grad()
def fit_expression_readout_(
    inner, processor, records: list[dict], batch_size: int = 32, gene_chunk: int = 4096
) -> float:
    """Sets the expression decoder's per-gene readout (`inner.expression_decoder.gene_readout`, see
    `ScMMGPTConfig.gene_expression_readout`) so that the decoder, with the rest of it as it is, gives the ridge fit of
    `records`' expression over every vocabulary gene (0 where a cell does not express one) on their real, unmasked
    mean cell token. With a per-gene variance (`ScMMGPTConfig.gene_expression_variance`), each gene's log-variance
    becomes that of the fit's residuals over `records` (floored at 1e-4), the Gaussian likelihood's maximum for the
    fitted mean. `inner` is the `ScMMGPTModel`. Returns the R^2 of the decoded expression over all (cell, gene)
    entries of `records`."""
    decoder = inner.expression_decoder
    if decoder.gene_readout is None:
        raise ValueError(
            "decoder_init='least_squares' fits the per-gene readout: build the model with gene_expression_readout=True."
        )
    config = inner.config.cell_config
    decoder.gene_readout.zero_()
    genes = torch.tensor([i for i in range(config.vocab_size) if i not in (config.pad_token_id, config.cls_token_id)])
    column = torch.full((config.vocab_size,), -1, dtype=torch.long)
    column[genes] = torch.arange(len(genes))
    queries, targets = [], []
    for start in range(0, len(records), batch_size):
        cells = processor.feature_extractor(records[start : start + batch_size])
        queries.append(inner.cell_tower(**cell_inputs(cells)).query_output.float())
        dense = torch.zeros(len(cells["cell_gene_ids"]), len(genes))
        rows, positions = cells["cell_attention_mask"].bool().nonzero(as_tuple=True)
        ids = cells["cell_gene_ids"][rows, positions]
        keep = column[ids] >= 0  # <cls> and padding are no genes
        dense[rows[keep], column[ids[keep]]] = cells["cell_expression"][rows, positions][keep].float()
        targets.append(dense)
    queries, targets = torch.cat(queries), torch.cat(targets)
    rest = torch.cat(  # what the decoder gives without the readout
        [
            torch.cat(
                [
                    inner.decode_expression(q, genes[g : g + gene_chunk]).float()
                    for g in range(0, len(genes), gene_chunk)
                ],
                1,
            )
            for q in queries.split(batch_size)
        ]
    )
    ridge = torch.nn.Linear(queries.shape[-1], len(genes), dtype=torch.float64)
    ridge_fit_(ridge, queries.mean(1), targets - rest)
    decoder.gene_readout[genes] = torch.cat([ridge.weight, ridge.bias[:, None]], 1).to(decoder.gene_readout)
    targets = targets.double()
    squared_residual = (targets - (rest.double() + ridge(queries.mean(1).double()))).square()
    if decoder.gene_log_variance is not None:
        residual_variance = squared_residual.mean(0)
        decoder.gene_log_variance[genes] = residual_variance.clamp(min=1e-4).log().to(decoder.gene_log_variance)
    return float(1 - squared_residual.sum() / (targets - targets.mean()).square().sum())


__all__ = ["BRIDGE_PARTS", "CODEBOOK_ENTRIES", "fit_bridges", "fit_expression_readout_", "ridge_fit_"]
