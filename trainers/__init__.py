"""Training stages for scMMGPT (contrastive, reconstruction, instruction) on transformers' Trainer and TRL.

Stage 1 (cell-text alignment), stage 2 (cell reconstruction) and stage 3 (instruction tuning, TRL's SFTTrainer);
`run_stage` / `pretrain_all` run them from YAML/JSON configs:

    from modeling_scmmgpt import ScMMGPTForPreTraining
    from trainers import ScMMGPTContrastiveArguments, ScMMGPTContrastiveCollator, ScMMGPTContrastiveTrainer
    model = ScMMGPTForPreTraining.from_pretrained("model/")  # its forward computes the stage's loss
    args = ScMMGPTContrastiveArguments(output_dir="out", max_steps=100)
    trainer = ScMMGPTContrastiveTrainer(model=model, args=args, processor=processor, train_dataset=ds["train"],
                                        data_collator=ScMMGPTContrastiveCollator(processor, args.max_text_length))
"""

from .arguments import ScMMGPTContrastiveArguments, ScMMGPTReconstructionArguments
from .collators import ScMMGPTContrastiveCollator, ScMMGPTReconstructionCollator
from .common import AtomicCheckpointsMixin, ScMMGPTStageTrainer
from .contrastive import ScMMGPTContrastiveTrainer
from .instruction import ScMMGPTInstructionArguments, ScMMGPTInstructionCollator, ScMMGPTInstructionTrainer
from .reconstruction import ScMMGPTReconstructionTrainer
from .run import STAGES, pretrain_all, run_stage


__all__ = [
    "STAGES",
    "AtomicCheckpointsMixin",
    "ScMMGPTInstructionArguments",
    "ScMMGPTInstructionCollator",
    "ScMMGPTInstructionTrainer",
    "pretrain_all",
    "run_stage",
    "ScMMGPTContrastiveArguments",
    "ScMMGPTContrastiveCollator",
    "ScMMGPTContrastiveTrainer",
    "ScMMGPTReconstructionArguments",
    "ScMMGPTReconstructionCollator",
    "ScMMGPTReconstructionTrainer",
    "ScMMGPTStageTrainer",
]
