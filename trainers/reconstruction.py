"""Stage 2 trainer: cell reconstruction. The loss is the model's own ([`ScMMGPTReconstructionLoss`], computed by
[`ScMMGPTForPreTraining`]); this trainer adds the seeded masks per step, the closed-form start of the expression
readout and the logging of the parts."""

from __future__ import annotations

import itertools

from transformers.utils import logging

from .bridges import fit_expression_readout_
from .common import ScMMGPTStageTrainer, base_model


logger = logging.get_logger(__name__)


class ScMMGPTReconstructionTrainer(ScMMGPTStageTrainer):
    """Stage 2 trainer (see [`ScMMGPTReconstructionLoss`]). Use with [`ScMMGPTReconstructionArguments`] and
    [`ScMMGPTReconstructionCollator`]; `evaluate()` reports `eval_loss`, `eval_masked_value_loss`,
    `eval_expression_loss`.

    Masks come from a generator seeded by (seed, step, micro-step, rank): a resumed run masks what the uninterrupted
    run masked, and evaluation uses the same masks at every `evaluate()`."""

    per_rank_draws = True

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
        variance = getattr(base_model(self.model).expression_decoder, "gene_log_variance", None)
        if variance is not None and self.decoder_fit is None and not variance.any():
            raise ValueError(
                "This model's per-gene expression variance (gene_expression_variance) is fitted, not trained, and "
                "has not been fitted: train with --decoder_init least_squares."
            )

    def used_modules(self, model, args) -> list:
        tower = model.cell_tower
        return [*tower.cell_path(), tower.masked_value_head, model.expression_decoder]
