"""Two-rank checks of the contrastive trainer, launched by tests/test_trainers.py with
`python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py MODEL_DIR DATA_DIR OUT_DIR`.

1. Loss and gradients: each rank collates its half of `examples.json`; the mean of the ranks' losses and the
   all-reduce-averaged gradients (what DDP does) are written by rank 0 for comparison with one process on all.
2. DDP training with Trainer: a few steps; each rank writes the cell ids it saw and its final weights.
"""

import json
import os
import sys

import datasets
import torch
import torch.distributed as dist

from modeling_scmmgpt import ScMMGPTForPreTraining, ScMMGPTProcessor
from trainers import ScMMGPTContrastiveArguments, ScMMGPTContrastiveCollator, ScMMGPTContrastiveTrainer


class RecordingCollator(ScMMGPTContrastiveCollator):
    seen: list

    def __call__(self, examples):
        self.seen.extend(ex["cell_id"] for ex in examples)
        return super().__call__(examples)


def arguments(out_dir, **kwargs):
    return ScMMGPTContrastiveArguments(
        output_dir=out_dir,
        use_cpu=True,
        ddp_backend="gloo",
        report_to="none",
        max_text_length=64,
        seed=0,
        save_strategy="no",
        dataloader_num_workers=0,
        **kwargs,
    )


def loss_and_grads(model_dir, out_dir):
    args = arguments(os.path.join(out_dir, "loss"))  # initialises the gloo process group through accelerate
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = ScMMGPTForPreTraining.from_pretrained(model_dir).eval()
    processor = ScMMGPTProcessor.from_pretrained(model_dir)
    collator = ScMMGPTContrastiveCollator(processor, max_text_length=64)
    trainer = ScMMGPTContrastiveTrainer(model=model, args=args, processor=processor, data_collator=collator)
    with open(os.path.join(out_dir, "examples.json"), encoding="utf-8") as f:
        examples = json.load(f)
    share = len(examples) // world_size
    batch = collator(examples[rank * share : (rank + 1) * share])
    loss, parts = trainer.compute_loss(model, batch, return_outputs=True)
    loss.backward()
    itm = parts["itm_loss"].detach().clone()
    dist.all_reduce(itm)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            grads[name] = param.grad / world_size
    if rank == 0:
        torch.save(
            {
                "loss": float(mean_loss) / world_size,
                "itc": parts["itc_loss"].item(),
                "itm": float(itm) / world_size,
                "grads": grads,
            },
            os.path.join(out_dir, "distributed_loss.pt"),
        )


def ddp_training(model_dir, data_dir, out_dir):
    args = arguments(os.path.join(out_dir, "ddp"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3)
    model = ScMMGPTForPreTraining.from_pretrained(model_dir)
    processor = ScMMGPTProcessor.from_pretrained(model_dir)
    collator = RecordingCollator(processor, max_text_length=64)
    collator.seen = []
    trainer = ScMMGPTContrastiveTrainer(
        model=model,
        args=args,
        processor=processor,
        data_collator=collator,
        train_dataset=datasets.load_from_disk(data_dir),
    )
    trainer.train()
    rank = dist.get_rank()
    torch.save(model.state_dict(), os.path.join(out_dir, f"weights_rank{rank}.pt"))
    with open(os.path.join(out_dir, f"cells_rank{rank}.json"), "w") as f:
        json.dump(collator.seen, f)


if __name__ == "__main__":
    model_dir, data_dir, out_dir = sys.argv[1:4]
    loss_and_grads(model_dir, out_dir)
    ddp_training(model_dir, data_dir, out_dir)
