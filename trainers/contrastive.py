"""Stage 1: cell-text alignment, BLIP-2's first stage with a cell encoder in place of the image encoder.

Loss = `itc_weight` * ITC + `itm_weight` * ITM, on the batch gathered from all ranks:

- ITC: symmetric InfoNCE between L2-normalised cell features (mean of the Q-Former query outputs, projected, as
  `get_cell_features`) and text features (Q-Former text path, `get_text_features`), scaled by
  `min(exp(logit_scale), max_logit_scale)`.
  **Duplicate texts.** Cells of one type share one description, so a batch holds the same text many times. Plain
  InfoNCE would push a cell away from identical copies of its own text (an unreachable target that also fights the
  other cells of its type). We use a multi-positive target instead: for a cell, every text with the same tokens is a
  positive and the target puts equal mass on them (likewise for a text over the cells sharing it). Without
  duplicates this is exactly CLIP's loss.
- ITM: BLIP-2's matching on hard negatives. For every cell one negative text, and for every text one negative cell,
  is drawn with probability softmax(similarity) over the global batch, never a positive (same text) and, when labels
  are given, never a pair of the same cell type (its text is not a negative). The Q-Former reads
  `[queries; text]` (`query_length = num_queries`) with cross-attention to the cell encoder outputs; `itm_head` on
  the mean query output classifies match/no match (2-way cross-entropy).

Distributed: features, encoder outputs and token ids are gathered from all ranks (features and encoder outputs with
gradients); every rank computes the global ITC, draws the same global negatives (generator seeded from the step),
and runs ITM on its own rows scaled so that the ranks' mean equals the single-process loss. With DDP's gradient
averaging this gives the single-process gradient of the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_bidirectional_mask

from .common import ScMMGPTStageTrainer, base_model, gather_batch, world


REQUIRED = (
    "cell_gene_ids",
    "cell_values",
    "cell_attention_mask",
    "text_input_ids",
    "text_attention_mask",
    "text_hash",
)


def multi_positive_infonce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with several positives per row.

    Args:
        logits (`torch.Tensor` of shape `(num_cells, num_texts)`): scaled similarities.
        positives (`torch.BoolTensor` of the same shape): which pairs match; every row and column needs one.
    Returns:
        Scalar: mean of the cell-to-text and text-to-cell cross-entropies against targets uniform over positives.
    """
    positives = positives.float()
    cell_to_text = -(positives / positives.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    text_to_cell = -(positives / positives.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return (cell_to_text + text_to_cell) / 2


def sample_hard_negatives(similarity: torch.Tensor, forbidden: torch.Tensor, generator: torch.Generator):
    """One negative per row, with probability softmax(similarity) over the allowed columns.

    Args:
        similarity (`torch.Tensor` of shape `(rows, columns)`), forbidden (`torch.BoolTensor`, same shape).
    Returns:
        `(index, valid)`, both `(rows,)`: the drawn column and whether the row had any allowed column.
    """
    valid = ~forbidden.all(1)
    weights = similarity.float().masked_fill(forbidden, float("-inf")).softmax(1)
    weights[~valid] = 1.0  # no negative exists for this row; draw anything and drop it via `valid`
    index = torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1).to(similarity.device)
    return index, valid


class ScMMGPTContrastiveTrainer(ScMMGPTStageTrainer):
    """Stage 1 trainer: ITC + ITM (see the module docstring). Use with [`ScMMGPTContrastiveArguments`] and
    [`ScMMGPTContrastiveCollator`]; `evaluate()` reports `eval_loss`, `eval_itc_loss`, `eval_itm_loss`."""

    def __init__(self, model=None, args=None, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        max_positions = base_model(model).config.qformer_config.max_position_embeddings
        if args.max_text_length > max_positions:
            raise ValueError(
                f"max_text_length={args.max_text_length} exceeds the Q-Former's {max_positions} positions."
            )

    def used_modules(self, model, args) -> list:
        tower = model.cell_tower
        parts = [*tower.cell_path(), tower.text_embeddings, tower.cell_projection]
        parts += [tower.text_projection, tower.logit_scale, tower.cell_feature_norm, tower.text_feature_norm]
        return parts + ([tower.itm_head] if args.itm_weight > 0 else [])

    def stage_loss(self, **inputs) -> dict:
        missing = [k for k in REQUIRED if k not in inputs]
        if missing:
            raise KeyError(f"Contrastive inputs lack {missing}; build batches with ScMMGPTContrastiveCollator.")
        model = base_model(self.accelerator.unwrap_model(self.model))
        tower = model.cell_tower
        cells = tower(inputs["cell_gene_ids"], inputs["cell_values"], inputs["cell_attention_mask"])
        # Same features as ScMMGPTModel.get_cell_features, computed from the tower output ITM needs as well.
        cell_features = tower.project_cells(cells.query_output)
        text_features = model.get_text_features(inputs["text_input_ids"], inputs["text_attention_mask"])

        all_cells, offset = gather_batch(cell_features, with_grad=True)
        all_texts, _ = gather_batch(text_features, with_grad=True)
        text_hash, _ = gather_batch(inputs["text_hash"], with_grad=False)
        positives = text_hash[:, None] == text_hash[None, :]  # (global cells, global texts)

        scale = tower.logit_scale.exp().clamp(max=self.args.max_logit_scale)
        logits = scale * all_cells.float() @ all_texts.float().T
        itc = multi_positive_infonce(logits, positives)
        out = {"itc_loss": itc, "logit_scale": scale.detach()}
        loss = self.args.itc_weight * itc
        if self.args.itm_weight > 0:
            forbidden = positives
            if inputs.get("label_hash") is not None:
                labels, _ = gather_batch(inputs["label_hash"], with_grad=False)
                forbidden = forbidden | (labels[:, None] == labels[None, :])
            local = torch.arange(offset, offset + cell_features.shape[0], device=logits.device)
            out["itm_loss"] = self._itm_loss(tower, cells, inputs, logits.detach(), forbidden, local)
            loss = loss + self.args.itm_weight * out["itm_loss"]
        out["loss"] = loss
        return out

    def _itm_loss(self, tower, cells, inputs, similarity, forbidden, local) -> torch.Tensor:
        """This rank's share of the global ITM loss: its own positives and negatives, summed and divided by the
        global number of pairs times the world size (so the mean over ranks is the global mean).

        Args:
            similarity, forbidden (`(global_batch, global_batch)`), local (`(local_batch,)`): the rows of this rank.
        """
        generator = self.step_generator(per_rank=False)  # same draw on every rank: the global batch is the same
        neg_text, text_ok = sample_hard_negatives(similarity, forbidden, generator)  # per cell
        neg_cell, cell_ok = sample_hard_negatives(similarity.T, forbidden.T, generator)  # per text
        encoder, _ = gather_batch(cells.encoder_last_hidden_state, with_grad=True, pad_dims=(1,))
        encoder_mask, _ = gather_batch(inputs["cell_attention_mask"], with_grad=False, pad_dims=(1,))
        text_ids, _ = gather_batch(inputs["text_input_ids"], with_grad=False, pad_dims=(1,))
        text_mask, _ = gather_batch(inputs["text_attention_mask"], with_grad=False, pad_dims=(1,))

        keep_text, keep_cell = local[text_ok[local]], local[cell_ok[local]]
        cell_rows = torch.cat([local, keep_text, neg_cell[keep_cell]])
        text_rows = torch.cat([local, neg_text[keep_text], keep_cell])
        targets = torch.cat([torch.ones_like(local), torch.zeros_like(keep_text), torch.zeros_like(keep_cell)])
        logits = self._itm_logits(
            tower, encoder[cell_rows], encoder_mask[cell_rows], text_ids[text_rows], text_mask[text_rows]
        )
        num_pairs = len(similarity) + int(text_ok.sum()) + int(cell_ok.sum())
        return F.cross_entropy(logits.float(), targets, reduction="sum") * world()[1] / num_pairs

    @staticmethod
    def _itm_logits(tower, encoder_states, encoder_mask, text_ids, text_mask) -> torch.Tensor:
        """Match logits `(pairs, 2)` for cells' encoder outputs `(pairs, genes, cell_hidden)` and texts
        `(pairs, tokens)`: queries and text in one Q-Former pass, queries cross-attending to the cell."""
        num_queries = tower.query_tokens.shape[1]
        queries = tower.query_tokens.expand(text_ids.shape[0], -1, -1)
        embeds = tower.text_embeddings(input_ids=text_ids, query_embeds=queries)
        attention_mask = torch.cat([text_mask.new_ones(text_ids.shape[0], num_queries), text_mask], dim=1)
        # Only the queries cross-attend, but Blip2QFormerModel (transformers 5.24) sizes a 2D encoder mask for the
        # whole [queries; text] sequence, which fails against the query-only cross-attention once cells are padded.
        # A mask prepared for the queries alone is passed through as it is.
        cross_mask = create_bidirectional_mask(
            config=tower.qformer.config,
            inputs_embeds=embeds[:, :num_queries],
            attention_mask=encoder_mask.bool(),
            encoder_hidden_states=encoder_states,
        )
        hidden = tower.qformer(
            query_embeds=embeds,
            query_length=num_queries,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_states,
            encoder_attention_mask=cross_mask,
        ).last_hidden_state
        return tower.itm_head(hidden[:, :num_queries].mean(dim=1))
