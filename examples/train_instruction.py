"""Stage 3 of scMMGPT: instruction tuning (describe, annotate, generate) with LoRA on the LM, on TRL's SFTTrainer.

    python examples/train_instruction.py examples/configs/instruction_tiny.yaml --model_name_or_path runs/reconstruction_tiny
    python examples/train_instruction.py examples/configs/instruction_smollm2.yaml      # the real SmolLM2-135M LM
    accelerate launch --config_file fsdp.yaml examples/train_instruction.py examples/configs/instruction_paper.yaml

The LoRA adapters are saved in `output_dir/adapter`, and the merged model (safetensors) plus processor in
`output_dir`, ready for `from_pretrained` and `pipeline()`.
"""

import sys

from trainers.run import run_stage


def main(argv=None, callbacks=None) -> dict:
    return run_stage("instruction", list(sys.argv[1:] if argv is None else argv), callbacks)


if __name__ == "__main__":
    print(main())
