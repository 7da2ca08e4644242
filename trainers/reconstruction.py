"""Stage 2: cell reconstruction, scGPT's generative objectives on scMMGPT's cell tower.

Loss = `masked_value_weight` * masked-value MSE + `expression_weight` * expression-decoding MSE:

- Masked values (scGPT's GEP): `mask_ratio` of each cell's real genes (never `<cls>` or padding) get `mask_value`
  in the encoder input; `masked_value_head` predicts the original input values (bins or continuous, whatever the
  processor produced) from the encoder outputs at those genes; MSE over masked genes only.
- Expression decoding (scGPT's MVC, through the queries): `decode_expression(query_output, gene_ids)` from the same
  (masked) pass regresses the processor's `expression` (pre-binning values) over every real gene. Decoding from the
  masked pass, as scGPT's MVC does, makes the cell tokens carry the masked genes too and costs one encoder pass.

Masks come from a generator seeded by (seed, step, micro-step, rank): a resumed run masks what the uninterrupted run
masked, and evaluation uses the same masks at every `evaluate()`.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .bridges import fit_expression_readout_
from .common import ScMMGPTStageTrainer, base_model


logger = logging.get_logger(__name__)


REQUIRED = ("cell_gene_ids", "cell_values", "cell_expression", "cell_attention_mask")


def sample_value_mask(eligible: torch.Tensor, ratio: float, generator: torch.Generator) -> torch.Tensor:
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


def add_unexpressed_genes(gene_ids, expression, valid, cell_config, count: int, generator: torch.Generator):
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


class ScMMGPTReconstructionTrainer(ScMMGPTStageTrainer):
    """Stage 2 trainer (see the module docstring). Use with [`ScMMGPTReconstructionArguments`] and
    [`ScMMGPTReconstructionCollator`]; `evaluate()` reports `eval_loss`, `eval_masked_value_loss`,
    `eval_expression_loss`."""

    def __init__(self, model=None, args=None, processor=None, train_dataset=None, **kwargs):
        super().__init__(model=model, args=args, processor=processor, train_dataset=train_dataset, **kwargs)
        self.decoder_fit = None
        if args.decoder_init == "least_squares" and train_dataset is not None:
            records = list(itertools.islice(iter(train_dataset), args.decoder_init_cells))
            inner = base_model(self.model)
            was_training = inner.training
            self.decoder_fit = fit_expression_readout_(inner.eval(), processor, records)
            inner.train(was_training)
            logger.info("Expression readout fitted on %d training cells: R^2 %.3f", len(records), self.decoder_fit)

    def used_modules(self, model, args) -> list:
        tower = model.cell_tower
        return [*tower.cell_path(), tower.masked_value_head, model.expression_decoder]

    def stage_loss(self, **inputs) -> dict:
        missing = [k for k in REQUIRED if k not in inputs]
        if missing:
            raise KeyError(f"Reconstruction inputs lack {missing}; build batches with ScMMGPTReconstructionCollator.")
        model = base_model(self.accelerator.unwrap_model(self.model))
        config = model.config.cell_config
        gene_ids, values, mask = inputs["cell_gene_ids"], inputs["cell_values"], inputs["cell_attention_mask"].bool()
        real = mask & gene_ids.ne(config.cls_token_id) & gene_ids.ne(config.pad_token_id)
        if not real.any():
            raise ValueError("No cell in the batch has any gene: nothing to reconstruct.")
        masked = sample_value_mask(real, self.args.mask_ratio, self.step_generator(per_rank=True))
        mask_value = config.mask_value if self.args.mask_value is None else self.args.mask_value
        outputs = model.cell_tower(gene_ids, values.masked_fill(masked, mask_value), mask)

        predicted = model.cell_tower.masked_value_head(outputs.encoder_last_hidden_state)
        masked_value_loss = F.mse_loss(predicted[masked].float(), values[masked].float())
        targets = (gene_ids, inputs["cell_expression"], real)
        if self.args.unexpressed_genes > 0:
            targets = add_unexpressed_genes(
                *targets, config, self.args.unexpressed_genes, self.step_generator(per_rank=True)
            )
        expression_loss = model.expression_loss(outputs.query_output, *targets)
        loss = self.args.masked_value_weight * masked_value_loss + self.args.expression_weight * expression_loss
        return {"loss": loss, "masked_value_loss": masked_value_loss, "expression_loss": expression_loss}
