"""Model card templates for scMMGPT checkpoints, rendered by `modeling_scmmgpt.hub.render_model_card`."""

from pathlib import Path


MODEL_CARD_TEMPLATE = Path(__file__).with_name("scmmgpt_model_card.md")

__all__ = ["MODEL_CARD_TEMPLATE"]
