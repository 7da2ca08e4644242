"""DDP training of the reconstruction or instruction stage on 2 ranks, launched by tests/test_trainers.py with
`python -m torch.distributed.run --nproc_per_node 2 tests/stage_worker.py STAGE MODEL_DIR DATA_DIR OUT_DIR`.
Each rank writes the cell ids it saw, its final weights, and its own and its logged values of one loss part."""

import json
import os
import sys

import datasets
import torch
import torch.distributed as dist

from modeling_scmmgpt import ScMMGPTProcessor
from trainers import (
    ScMMGPTInstructionArguments,
    ScMMGPTInstructionCollator,
    ScMMGPTInstructionTrainer,
    ScMMGPTReconstructionArguments,
    ScMMGPTReconstructionCollator,
    ScMMGPTReconstructionTrainer,
)
from trainers.run import model_class_for


def recording(collator, seen: list):
    def collate(examples):
        seen.extend(ex["cell_id"] for ex in examples)
        return collator(examples)

    return collate


def main(stage, model_dir, data_dir, out_dir):
    common = dict(
        output_dir=os.path.join(out_dir, stage),
        use_cpu=True,
        ddp_backend="gloo",
        report_to="none",
        seed=0,
        save_strategy="no",
        dataloader_num_workers=0,
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        disable_tqdm=True,
        logging_steps=1,
    )
    model = model_class_for(stage).from_pretrained(model_dir)
    processor = ScMMGPTProcessor.from_pretrained(model_dir)
    data, seen = datasets.load_from_disk(data_dir), []
    if stage == "reconstruction":
        args = ScMMGPTReconstructionArguments(**common)
        trainer = ScMMGPTReconstructionTrainer(
            model=model,
            args=args,
            processor=processor,
            train_dataset=data,
            data_collator=recording(ScMMGPTReconstructionCollator(processor), seen),
        )
    else:
        args = ScMMGPTInstructionArguments(**common, lora_r=4)
        collator = recording(ScMMGPTInstructionCollator(processor), seen)
        trainer = ScMMGPTInstructionTrainer(model, args, processor, train_dataset=data, data_collator=collator)
    # Each rank's own value of one loss part per step, read where the trainer collects them for logging.
    part, collected = (
        ("masked_value_loss", trainer._metrics["train"])
        if stage == "reconstruction"
        else ("lm_loss", trainer._loss_parts)
    )
    local, compute_loss = [], trainer.compute_loss

    def recorded(*args, **kwargs):
        out = compute_loss(*args, **kwargs)
        local.append(collected[part][-1])
        return out

    trainer.compute_loss = recorded
    trainer.train()
    rank = dist.get_rank()
    logged = [log[part] for log in trainer.state.log_history if part in log]
    with open(os.path.join(out_dir, f"{stage}_losses_rank{rank}.json"), "w") as f:
        json.dump({"local": local, "logged": logged}, f)
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save(state, os.path.join(out_dir, f"{stage}_weights_rank{rank}.pt"))
    with open(os.path.join(out_dir, f"{stage}_cells_rank{rank}.json"), "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
