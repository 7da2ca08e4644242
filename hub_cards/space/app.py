"""A Hugging Face Space serving scMMGPT's web app for {model_repo} (written by `scmmgpt app --write-space`)."""

import os

from scmmgpt.app import DEFAULT_MAX_CELLS, build_app


page = build_app(
    os.environ.get("SCMMGPT_MODEL", "{model_repo}"),
    max_cells=int(os.environ.get("SCMMGPT_MAX_CELLS", DEFAULT_MAX_CELLS)),
)

if __name__ == "__main__":
    page.queue(default_concurrency_limit=1).launch()
