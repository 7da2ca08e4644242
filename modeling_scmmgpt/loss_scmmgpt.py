"""The objectives of the two pre-training stages, as loss modules in the spirit of open_clip's `ClipLoss`.

[`ScMMGPTForPreTraining`] holds them and computes them in its `forward`, so a plain `transformers.Trainer` trains
either stage from the model's own loss. Their weights and settings are fields of [`ScMMGPTConfig`] (saved with the
model); the stage trainers only add what a trainer alone can: seeded random draws per step, logging of the parts,
atomic checkpoints.

Random choices (ITM negatives, masked genes, zero-expression genes) come from the `generator` passed to `forward`, or
torch's global generator without one. Under data parallelism the losses are computed on the batch gathered from all
ranks ([`gather_batch`]), so with DDP's gradient averaging each rank gets the single-process gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import gather_batch, world


class _ConfiguredLoss(nn.Module):
    """A loss without parameters that reads its weights and settings from the model's config at every call (a stage
    trainer may set them after the model is built)."""

    def __init__(self, config):
        super().__init__()
        self.config = config


# --- stage 1: cell-text alignment -------------------------------------------------------------------------------------
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


def sample_hard_negatives(similarity: torch.Tensor, forbidden: torch.Tensor, generator: torch.Generator | None):
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


class ScMMGPTContrastiveLoss(_ConfiguredLoss):
    """Stage 1, BLIP-2's first stage with a cell encoder in place of the image encoder:
    `config.itc_loss_weight` * ITC + `config.itm_loss_weight` * ITM, on the batch gathered from all ranks.

    - ITC: symmetric InfoNCE between the cell features (`ScMMGPTCellTower.project_cells`) and the text features
      (`get_text_features`), scaled by `min(exp(logit_scale), config.max_logit_scale)`.
      **Duplicate texts.** Cells of one type share one description, so a batch holds the same text many times. Plain
      InfoNCE would push a cell away from identical copies of its own text (an unreachable target that also fights
      the other cells of its type). The target is multi-positive instead: for a cell, every text with the same tokens
      (`text_hash`) is a positive, with equal mass (likewise for a text over the cells sharing it). Without
      duplicates this is exactly CLIP's loss.
    - ITM: BLIP-2's matching on hard negatives. For every cell one negative text, and for every text one negative
      cell, is drawn with probability softmax(similarity) over the global batch, never a positive and, with
      `cell_type_hash`, never a pair of the same cell type (LAVIS masks same-image pairs alike). The Q-Former reads
      `[queries; text]` with cross-attention to the cell ([`ScMMGPTCellTower.match_logits`]).

    Distributed: every rank computes the global ITC and draws the same global negatives (the generator must be equal
    on all ranks), and runs ITM on its own rows, scaled so that the ranks' mean equals the single-process loss.
    """

    def forward(
        self,
        model,
        cell_gene_ids: torch.LongTensor,
        cell_values: torch.Tensor,
        cell_attention_mask: torch.Tensor,
        text_input_ids: torch.LongTensor,
        text_attention_mask: torch.Tensor,
        text_hash: torch.LongTensor,
        cell_type_hash: torch.LongTensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        r"""
        Args:
            model ([`ScMMGPTModel`]): the model whose cell tower and text path are trained.
            cell_gene_ids, cell_values, cell_attention_mask (`(batch_size, num_genes)`): the cells.
            text_input_ids, text_attention_mask (`(batch_size, num_tokens)`): their texts (Q-Former tokenizer).
            text_hash (`(batch_size,)` int64): equal for equal texts; cell_type_hash (`(batch_size,)`, *optional*): equal
                for cells of one type.
        Returns:
            `dict` with `loss`, `itc_loss`, `logit_scale` and, when `config.itm_loss_weight > 0`, `itm_loss`.
        """
        config, tower = self.config, model.cell_tower
        cells = tower(cell_gene_ids, cell_values, cell_attention_mask)
        cell_features = tower.project_cells(cells.query_output)
        text_features = model.get_text_features(text_input_ids, text_attention_mask)

        all_cells, offset = gather_batch(cell_features, with_grad=True)
        all_texts, _ = gather_batch(text_features, with_grad=True)
        text_hash, _ = gather_batch(text_hash, with_grad=False)
        positives = text_hash[:, None] == text_hash[None, :]  # (global cells, global texts)

        scale = tower.logit_scale.exp().clamp(max=config.max_logit_scale)
        logits = scale * all_cells.float() @ all_texts.float().T
        itc = multi_positive_infonce(logits, positives)
        out = {"itc_loss": itc, "logit_scale": scale.detach()}
        loss = config.itc_loss_weight * itc
        if config.itm_loss_weight > 0:
            forbidden = positives
            if cell_type_hash is not None:
                types, _ = gather_batch(cell_type_hash, with_grad=False)
                forbidden = forbidden | (types[:, None] == types[None, :])
            local = torch.arange(offset, offset + cell_features.shape[0], device=logits.device)
            pairs = (cells.encoder_last_hidden_state, cell_attention_mask, text_input_ids, text_attention_mask)
            out["itm_loss"] = self._itm_loss(tower, pairs, logits.detach(), forbidden, local, generator)
            loss = loss + config.itm_loss_weight * out["itm_loss"]
        out["loss"] = loss
        return out

    @staticmethod
    def _itm_loss(tower, pairs, similarity, forbidden, local, generator) -> torch.Tensor:
        """This rank's share of the global ITM loss: its own positives and negatives, summed and divided by the
        global number of pairs times the world size (so the mean over ranks is the global mean).

        Args:
            pairs: this rank's encoder outputs, cell mask, text ids and text mask.
            similarity, forbidden (`(global_batch, global_batch)`), local (`(local_batch,)`): the rows of this rank.
        """
        neg_text, text_ok = sample_hard_negatives(similarity, forbidden, generator)  # per cell
        neg_cell, cell_ok = sample_hard_negatives(similarity.T, forbidden.T, generator)  # per text
        encoder_states, encoder_mask, text_ids, text_mask = pairs
        encoder, _ = gather_batch(encoder_states, with_grad=True, pad_dims=(1,))
        encoder_mask, _ = gather_batch(encoder_mask, with_grad=False, pad_dims=(1,))
        text_ids, _ = gather_batch(text_ids, with_grad=False, pad_dims=(1,))
        text_mask, _ = gather_batch(text_mask, with_grad=False, pad_dims=(1,))

        keep_text, keep_cell = local[text_ok[local]], local[cell_ok[local]]
        cell_rows = torch.cat([local, keep_text, neg_cell[keep_cell]])
        text_rows = torch.cat([local, neg_text[keep_text], keep_cell])
        targets = torch.cat([torch.ones_like(local), torch.zeros_like(keep_text), torch.zeros_like(keep_cell)])
        logits = tower.match_logits(
            encoder[cell_rows], encoder_mask[cell_rows], text_ids[text_rows], text_mask[text_rows]
        )
        num_pairs = len(similarity) + int(text_ok.sum()) + int(cell_ok.sum())
        return F.cross_entropy(logits.float(), targets, reduction="sum") * world()[1] / num_pairs


# --- stage 2: cell reconstruction -------------------------------------------------------------------------------------
def sample_value_mask(eligible: torch.Tensor, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """Picks `round(ratio * n)` (at least one) of the `n` eligible genes of each cell uniformly at random.

    Args:
        eligible (`torch.BoolTensor` of shape `(cells, genes)`): maskable positions.
    Returns:
        `torch.BoolTensor` of the same shape, a subset of `eligible`.
    """
    scores = torch.rand(eligible.shape, generator=generator).to(eligible.device)
    scores = scores.masked_fill(~eligible, 2.0)  # ineligible genes sort last
    count = eligible.sum(1, keepdim=True)
    k = torch.where(count > 0, (count * ratio).round().clamp(min=1), torch.zeros_like(count))
    ranks = scores.argsort(1).argsort(1)
    return (ranks < k) & eligible


def add_unexpressed_genes(gene_ids, expression, valid, cell_config, count: int, generator: torch.Generator | None):
    """Appends `count` random vocabulary genes per cell with target expression 0, valid where the cell does not
    express them (never `<cls>` or padding).

    Returns:
        `(gene_ids, expression, valid)`, each `(cells, genes + count)`.
    """
    drawn = torch.randint(0, cell_config.vocab_size, (gene_ids.shape[0], count), generator=generator).to(
        gene_ids.device
    )
    special = drawn.eq(cell_config.cls_token_id) | drawn.eq(cell_config.pad_token_id)
    expressed = (drawn[:, :, None] == gene_ids[:, None, :]).any(-1)
    return (
        torch.cat([gene_ids, drawn], 1),
        torch.cat([expression, expression.new_zeros(drawn.shape)], 1),
        torch.cat([valid, ~(special | expressed)], 1),
    )


class ScMMGPTReconstructionLoss(_ConfiguredLoss):
    """Stage 2, scGPT's generative objectives on scMMGPT's cell tower:
    `config.masked_value_loss_weight` * masked-value MSE + `config.expression_loss_weight` * expression MSE.

    - Masked values (scGPT's GEP): `config.mask_ratio` of each cell's real genes (never `<cls>` or padding) get the
      cell encoder's `mask_value` in the encoder input; `masked_value_head` predicts the original input values (bins
      or continuous, whatever the processor produced) at those genes; MSE over masked genes only.
    - Expression decoding (scGPT's MVC, through the queries): `decode_expression(query_output, gene_ids)` from the
      same masked pass regresses the processor's `expression` (pre-binning values) over every real gene, plus
      `config.unexpressed_genes` random genes the cell does not express, with target 0 (cells list expressed genes
      only: without them the decoder never sees a zero).
    """

    def forward(
        self,
        model,
        cell_gene_ids: torch.LongTensor,
        cell_values: torch.Tensor,
        cell_attention_mask: torch.Tensor,
        cell_expression: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        r"""
        Args:
            model ([`ScMMGPTModel`]): the model whose cell tower and expression decoder are trained.
            cell_gene_ids, cell_values, cell_attention_mask, cell_expression (`(batch_size, num_genes)`): the cells
                and the expression to reconstruct (the cell processor's `expression`).
        Returns:
            `dict` with `loss`, `masked_value_loss` and `expression_loss`.
        """
        config, cell_config = self.config, self.config.cell_config
        mask = cell_attention_mask.bool()
        real = mask & cell_gene_ids.ne(cell_config.cls_token_id) & cell_gene_ids.ne(cell_config.pad_token_id)
        if not real.any():
            raise ValueError("No cell in the batch has any gene: nothing to reconstruct.")
        masked = sample_value_mask(real, config.mask_ratio, generator)
        outputs = model.cell_tower(cell_gene_ids, cell_values.masked_fill(masked, cell_config.mask_value), mask)

        predicted = model.cell_tower.masked_value_head(outputs.encoder_last_hidden_state)
        masked_value_loss = F.mse_loss(predicted[masked].float(), cell_values[masked].float())
        targets = (cell_gene_ids, cell_expression, real)
        if config.unexpressed_genes > 0:
            targets = add_unexpressed_genes(*targets, cell_config, config.unexpressed_genes, generator)
        expression_loss = model.expression_loss(outputs.query_output, *targets)
        loss = config.masked_value_loss_weight * masked_value_loss + config.expression_loss_weight * expression_loss
        return {"loss": loss, "masked_value_loss": masked_value_loss, "expression_loss": expression_loss}


__all__ = [
    "ScMMGPTContrastiveLoss",
    "ScMMGPTReconstructionLoss",
    "add_unexpressed_genes",
    "multi_positive_infonce",
    "sample_hard_negatives",
    "sample_value_mask",
]
