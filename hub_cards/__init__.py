"""Templates for the Hub: the model card of scMMGPT checkpoints (rendered by `modeling_scmmgpt.hub.render_model_card`)
and the files of a Space serving the web app (written by `scmmgpt.app.write_space`)."""

from pathlib import Path


MODEL_CARD_TEMPLATE = Path(__file__).with_name("scmmgpt_model_card.md")
SPACE_TEMPLATE = Path(__file__).with_name("space")


def space_template_files() -> dict[str, str]:
    """The Space's files by name (`app.py`, `requirements.txt`, `README.md`), with a `{model_repo}` placeholder."""
    return {path.name: path.read_text(encoding="utf-8") for path in sorted(SPACE_TEMPLATE.iterdir()) if path.is_file()}


__all__ = ["MODEL_CARD_TEMPLATE", "SPACE_TEMPLATE", "space_template_files"]
