"""Runs a shipped training entry point on every rank of a `torchrun`, recording what each rank trained. Launched by
tests/test_trainers.py:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/entry_point_worker.py OUT_DIR FAULT \\
        ENTRY ARGS...

ENTRY is `examples/pretrain_all.py` (run as a script) or `scmmgpt` (the CLI's `main`), with its own ARGS. For each
stage and rank r it writes to OUT_DIR:
- `<stage>_rank<r>.safetensors`: the rank's weights when `train()` returns;
- `<stage>_fitted_rank<r>.safetensors`: the rank's weights and buffers once the stage has fitted its open-set
  reference (what the stage saves);
- `<stage>_cells_rank<r>.json`: the cell ids of each training batch it collated, in order;
- `<stage>_log_rank<r>.json`: the trainer's log history;
- `contrastive_start.safetensors` (rank 0): the weights stage 1 starts from.

Dropout is switched off ([`no_dropout`]), so a test can recompute the stage-1 loss in one process. FAULT injects a
known way of breaking data parallelism: `none`, `evaluate_first` (an `evaluate()` before `train()`, which leaves the
model unwrapped) or `diverge` (rank 1 changes a weight as training ends).
"""

import json
import os
import runpy
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import TrainerCallback

import trainers.run


def no_dropout(model) -> None:
    """Dropout off everywhere: `nn.Dropout` modules and the attention-probability dropout that BERT-style attention
    (the Q-Former) applies from a float attribute."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _tensors(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}


class Recorder(TrainerCallback):
    def __init__(self, stage, out_dir, fault, train_ids):
        self.stage, self.out_dir, self.fault, self.train_ids = stage, out_dir, fault, set(train_ids)
        self.batches = []

    def path(self, kind):
        return os.path.join(self.out_dir, f"{self.stage}_{kind}_rank{dist.get_rank()}")

    def collator(self, collate):
        def recorded(features):
            if all(f["cell_id"] in self.train_ids for f in features):  # not an evaluation batch
                self.batches.append([f["cell_id"] for f in features])
            return collate(features)

        return recorded

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.stage == "contrastive" and dist.get_rank() == 0:
            save_file(_tensors(model), os.path.join(self.out_dir, "contrastive_start.safetensors"))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.fault == "diverge" and dist.get_rank() == 1:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).add_(1e-3)
        with open(self.path("cells") + ".json", "w") as f:
            json.dump(self.batches, f)
        with open(self.path("log") + ".json", "w") as f:
            json.dump(state.log_history, f)


def main(out_dir, fault, entry, *argv):
    os.makedirs(out_dir, exist_ok=True)
    original = trainers.run._trainer

    def recording_trainer(stage, model, processor, args, data, callbacks):
        no_dropout(model)
        trainer = original(stage, model, processor, args, data, callbacks)
        recorder = Recorder(stage, out_dir, fault, data["train"]["cell_id"])
        trainer.data_collator = recorder.collator(trainer.data_collator)
        trainer.add_callback(recorder)
        if fault == "evaluate_first":
            trainer.evaluate()
        train = trainer.train

        def recorded_train(*args, **kwargs):
            output = train(*args, **kwargs)
            path = os.path.join(out_dir, f"{stage}_rank{dist.get_rank()}.safetensors")
            save_file(_tensors(trainer.model), path)
            return output

        trainer.train = recorded_train
        return trainer

    fit_open_set = trainers.run._fit_open_set

    def recording_fit_open_set(trainer, model_args, data):
        result = fit_open_set(trainer, model_args, data)
        stage = os.path.basename(os.path.normpath(trainer.args.output_dir))  # pretrain_all writes <root>/<stage>
        path = os.path.join(out_dir, f"{stage}_fitted_rank{dist.get_rank()}.safetensors")
        save_file(_tensors(trainer.accelerator.unwrap_model(trainer.model)), path)
        return result

    trainers.run._trainer = recording_trainer
    trainers.run._fit_open_set = recording_fit_open_set
    if entry == "scmmgpt":
        from scmmgpt.cli import main as cli_main

        sys.exit(cli_main(list(argv)))
    sys.argv = [entry, *argv]
    runpy.run_path(entry, run_name="__main__")


if __name__ == "__main__":
    main(*sys.argv[1:])
