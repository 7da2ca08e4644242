"""Stage 2 of scMMGPT: cell reconstruction (masked values + expression decoded from the cell tokens) on the embedded PBMC demo.

    python examples/train_reconstruction.py examples/configs/reconstruction_tiny.yaml            # ~1 min on 2 CPU cores
    python examples/train_reconstruction.py examples/configs/reconstruction_tiny.yaml --max_steps 10
    torchrun --nproc_per_node 2 examples/train_reconstruction.py examples/configs/reconstruction_tiny.yaml --ddp_backend gloo
    accelerate launch --config_file fsdp.yaml examples/train_reconstruction.py examples/configs/reconstruction_paper.yaml

Without `--model_name_or_path` it trains the tiny random demo model. The final model and processor are saved
with `save_pretrained` in `output_dir` (checkpoints in `output_dir/checkpoint-N`).
"""

import sys

from trainers.run import run_stage


def main(argv=None, callbacks=None) -> dict:
    return run_stage("reconstruction", list(sys.argv[1:] if argv is None else argv), callbacks)


if __name__ == "__main__":
    print(main())
