"""Stage 1 trainer: cell-text alignment. The loss is the model's own ([`ScMMGPTContrastiveLoss`], computed by
[`ScMMGPTForPreTraining`]); this trainer adds the seeded ITM negatives per step and the logging of the parts."""

from __future__ import annotations

from .common import ScMMGPTStageTrainer, base_model


class ScMMGPTContrastiveTrainer(ScMMGPTStageTrainer):
    """Stage 1 trainer: ITC + ITM (see [`ScMMGPTContrastiveLoss`]). Use with [`ScMMGPTContrastiveArguments`] and
    [`ScMMGPTContrastiveCollator`]; `evaluate()` reports `eval_loss`, `eval_itc_loss`, `eval_itm_loss`.

    The ITM negatives are drawn over the global batch, so every rank draws them alike (`per_rank_draws = False`)."""

    per_rank_draws = False

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
        return parts + ([tower.itm_head] if model.config.itm_loss_weight > 0 else [])
