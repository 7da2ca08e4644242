"""Stage 2 of scMMGPT: cell reconstruction (masked values + expression decoded from the cell tokens) on the embedded PBMC demo.

Start it from stage 1's model, so the decoder learns to read cell tokens that are already aligned with text:

    python examples/train_reconstruction.py examples/configs/reconstruction_tiny.yaml --model_name_or_path runs/contrastive_tiny

The stage's own options, on the command line or in the YAML (each written into the model's config):
`--mask_ratio 0.15` (genes whose value is masked), `--unexpressed_genes 256` (genes a cell does not express, decoded
with target 0), `--masked_value_loss_weight` and `--expression_loss_weight`. `--cell_path_learning_rate 0` keeps
stage 1's cell path and trains only the decoder and the masked-value head. It runs under torchrun and
`accelerate launch` as stage 1 does (examples/train_contrastive.py).

The final model and processor are saved with `save_pretrained` in `output_dir`.
"""

import sys

from trainers.run import run_stage


def main(argv=None, callbacks=None) -> dict:
    return run_stage("reconstruction", list(sys.argv[1:] if argv is None else argv), callbacks)


if __name__ == "__main__":
    print(main())
