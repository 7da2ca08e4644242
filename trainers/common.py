"""What both pre-training stages share: atomic checkpoints, the stage's TrainingArguments written into the model's
loss settings, loss-only evaluation, seeded per-step randomness, logging of the loss parts over ranks, the check
that ranks train one model, and freezing of unused modules."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import os
import shutil
from collections import defaultdict

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from modeling_scmmgpt import ScMMGPTForPreTraining
from modeling_scmmgpt.configuration_scmmgpt import PRETRAINING_LOSS_SETTINGS
from modeling_scmmgpt.distributed import world
from modeling_scmmgpt.processing_scmmgpt import cell_inputs


STAGING_PREFIX = f".tmp-{PREFIX_CHECKPOINT_DIR}"


# --- randomness -------------------------------------------------------------------------------------------------------
def seeded_generator(*key) -> torch.Generator:
    """A CPU `torch.Generator` seeded from `key` (e.g. `(seed, step, micro_step)`) with a hash that is stable across
    processes and Python runs (unlike `hash()`), so a resumed or distributed run draws the same numbers."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def stable_hash(items) -> int:
    """A signed 64-bit hash of a string or a sequence of ints, equal on every rank (cross-rank equality test)."""
    data = items.encode() if isinstance(items, str) else repr(tuple(int(i) for i in items)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


# --- model access -----------------------------------------------------------------------------------------------------
def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The `ScMMGPTModel` inside a `ScMMGPTForConditionalGeneration` or `ScMMGPTForPreTraining` (or the model itself)."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "cell_tower"):
        raise TypeError(f"{type(model).__name__} is not an scMMGPT model (no `cell_tower`).")
    return inner


def freeze_unused(model: torch.nn.Module, used: list[torch.nn.Module | torch.nn.Parameter]) -> list[str]:
    """Sets `requires_grad=False` on every parameter outside `used` (never turns one on, so config freezes hold).

    A stage that never touches the LM must not give it to the optimizer or DDP's gradient buckets (7B parameters of
    buckets for nothing). Returns the names of the parameters it froze."""
    keep = set()
    for part in used:
        keep.update(id(p) for p in ([part] if isinstance(part, torch.nn.Parameter) else part.parameters()))
    frozen = []
    for name, param in model.named_parameters():
        if id(param) not in keep and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


class AtomicCheckpointsMixin:
    """Checkpoints written under `.tmp-checkpoint-N/` and renamed to `checkpoint-N` once every rank has finished
    writing, so a crash mid-save never leaves a `checkpoint-N` that `resume_from_checkpoint` would pick. Mix in
    before `Trainer` (or a TRL trainer)."""

    # --- atomic checkpoints -----------------------------------------------------------------------------------------
    def _get_output_dir(self, trial):
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """transformers 5.24 writes straight into `checkpoint-N` (model, then optimizer, RNG, trainer state), so a
        crash mid-save leaves a folder that `get_last_checkpoint` takes for complete. We let it write into
        `.tmp-checkpoint-N/checkpoint-N` (not matched by `checkpoint-*`), fsync it, then `os.replace` it into place."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f"{STAGING_PREFIX}-{self.state.global_step}")
        if self.args.should_save and os.path.exists(staging):
            shutil.rmtree(staging)  # left by a crash during an earlier save of this step
        self.accelerator.wait_for_everyone()
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        staged, final = os.path.join(staging, name), os.path.join(run_dir, name)
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state / shards
        if self.args.should_save:
            self._finalise_state(run_dir, staging, staged)
            _fsync_tree(staged)
            if os.path.exists(final):  # a re-save of the same step: replace it
                shutil.rmtree(final)
            os.replace(staged, final)
            shutil.rmtree(staging, ignore_errors=True)
            _fsync_dir(run_dir)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _finalise_state(self, run_dir: str, staging: str, staged: str):
        """The parent looked for the best checkpoint in the staging folder: point it at the final location and
        rewrite the saved trainer state."""
        if self.state.best_global_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if self.state.best_global_step == self.state.global_step or os.path.exists(best):
                self.state.best_model_checkpoint = best
            state_file = os.path.join(staged, "trainer_state.json")
            if os.path.exists(state_file):
                self.state.save_to_json(state_file)


# --- data parallelism ------------------------------------------------------------------------------------------------
def data_parallel_wrapper(model: torch.nn.Module) -> str | None:
    """`"DDP"`, `"FSDP"` or `"DeepSpeed"` when `model` (as the training step receives it) is wrapped for data
    parallelism, else None."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    model = getattr(model, "_orig_mod", model)  # torch.compile
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return "DDP"
    if isinstance(model, (FullyShardedDataParallel, FSDPModule)):
        return "FSDP"
    if type(model).__name__ == "DeepSpeedEngine":
        return "DeepSpeed"
    return None


def weights_checksum(model: torch.nn.Module) -> tuple[list[str], torch.Tensor]:
    """Names and a `(num_tensors, 2)` float64 tensor of each parameter's and buffer's sum and sum of squares: equal on
    ranks that hold the same weights, one pass over them."""
    tensors = dict(model.named_parameters())
    tensors.update((name, b) for name, b in model.named_buffers() if b.is_floating_point())
    sums = [torch.stack([t.detach().double().sum(), t.detach().double().square().sum()]) for t in tensors.values()]
    return list(tensors), torch.stack(sums)


class RanksInStepMixin:
    """Data-parallel training that really is parallel. With more than one rank:

    - the first training step fails unless the model is wrapped in DDP, FSDP or DeepSpeed: an unwrapped model trains
      one independent copy per rank, silently (e.g. after an `evaluate()` before `train()`, which prepares the model
      for evaluation only, so that `train()` no longer wraps it);
    - after training, DDP ranks must agree on a checksum of their weights ([`weights_checksum`]). FSDP and ZeRO
      shard the weights, so each rank holds different tensors; their frameworks keep the shards consistent.

    Mix in before `Trainer` (or a TRL trainer).
    """

    def training_step(self, model, *args, **kwargs):
        if self.args.world_size > 1 and not getattr(self, "_wrapping_checked", False):
            if data_parallel_wrapper(model) is None:
                raise RuntimeError(
                    f"{self.args.world_size} ranks are training an unwrapped {type(model).__name__}, so each would train "
                    "its own copy; let Trainer wrap it: do not call evaluate(), predict() or accelerator.prepare() on "
                    "the model before train() (run a baseline evaluation from a callback's on_train_begin instead)."
                )
            self._wrapping_checked = True
        return super().training_step(model, *args, **kwargs)

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.args.world_size > 1 and data_parallel_wrapper(self.model_wrapped) == "DDP":
            check_ranks_agree(self.accelerator.unwrap_model(self.model_wrapped))
        return output


def check_ranks_agree(model: torch.nn.Module) -> None:
    """Raises on every rank if the ranks' [`weights_checksum`]s differ."""
    names, local = weights_checksum(model)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    differing = sorted(
        {names[i] for other in gathered[1:] for i in (other != gathered[0]).any(1).nonzero().flatten().tolist()}
    )
    if differing:
        raise RuntimeError(
            f"After training, the ranks hold different weights in {len(differing)} of {len(names)} tensors (e.g. "
            f"{', '.join(differing[:3])}): they trained separate models. Check that nothing changes the weights on "
            "one rank only, and that the model is wrapped in DDP for the whole run."
        )


def write_loss_settings(model, args) -> None:
    """Writes the loss settings that `args` gives (not None; `PRETRAINING_LOSS_SETTINGS`, the config's own field
    names) into the model's config, the one place the losses read them from, so they are saved with the model."""
    for name in PRETRAINING_LOSS_SETTINGS:
        if getattr(args, name, None) is not None:
            setattr(model.config, name, getattr(args, name))


# --- the trainer base -------------------------------------------------------------------------------------------------
class ScMMGPTStageTrainer(RanksInStepMixin, AtomicCheckpointsMixin, Trainer):
    """Base of the stage trainers, around a [`ScMMGPTForPreTraining`] whose `forward` computes the stage's loss (a
    plain `Trainer` trains it too). What only a trainer can add:

    - the stage's loss options given as TrainingArguments (None keeps the model's) are written into the model's
      config ([`write_loss_settings`]);
    - random choices (negatives, masks) come from [`step_generator`], seeded from `args.seed` and the step;
    - the loss parts are logged (`eval_<part>` too: `prediction_step` is loss-only), averaged over ranks;
    - checkpoints are atomic ([`AtomicCheckpointsMixin`]); with several ranks, training fails unless they train one
      model ([`RanksInStepMixin`]); parameters the stage does not use can be frozen.

    Subclasses set `per_rank_draws` and `used_modules`.
    """

    per_rank_draws: bool = True

    def __init__(self, model=None, args=None, processor=None, **kwargs):
        if model is None or args is None:
            raise ValueError(f"{type(self).__name__} needs a model and its stage's TrainingArguments.")
        if not isinstance(model, ScMMGPTForPreTraining):
            raise TypeError(
                f"{type(self).__name__} trains a ScMMGPTForPreTraining, whose forward computes the stage's loss, not a "
                f"{type(model).__name__}: load it with ScMMGPTForPreTraining.from_pretrained(folder) (the same weights)."
            )
        write_loss_settings(model, args)
        model.config.validate()
        if getattr(args, "freeze_unused_modules", False):
            freeze_unused(model, self.used_modules(base_model(model), args))
        for params, rate in self._parameter_groups(model, args):
            if rate == 0:
                for param in params:
                    param.requires_grad_(False)
        kwargs.setdefault("processing_class", processor)
        super().__init__(model=model, args=args, **kwargs)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._micro = (-1, 0)  # (global step, micro-batches seen in it)
        self._eval_batches = 0

    @staticmethod
    def _parameter_groups(model, args) -> list[tuple[list[torch.nn.Parameter], float]]:
        """(parameters, learning rate) for `args.cell_path_learning_rate` and `args.text_path_learning_rate` where
        set. The Q-Former's self-attention belongs to both paths and takes the lower of the two rates."""
        tower = base_model(model).cell_tower
        cell = [
            p
            for part in tower.cell_path()
            for p in ([part] if isinstance(part, torch.nn.Parameter) else part.parameters())
        ]
        rates, params = {}, {}
        for members, rate in (
            (cell, getattr(args, "cell_path_learning_rate", None)),
            (tower.text_path_parameters(), getattr(args, "text_path_learning_rate", None)),
        ):
            if rate is None:
                continue
            for p in members:
                rates[id(p)], params[id(p)] = min(rate, rates.get(id(p), rate)), p
        by_rate = defaultdict(list)
        for key, rate in rates.items():
            by_rate[rate].append(params[key])
        return [(members, rate) for rate, members in by_rate.items()]

    def create_optimizer(self, model=None):
        """Trainer's optimizer, with the cell and text paths in groups of their own where their learning rates are
        set (see [`_parameter_groups`])."""
        optimizer = super().create_optimizer(model)
        return regroup_optimizer(
            optimizer, self._parameter_groups(self.accelerator.unwrap_model(self.model), self.args)
        )

    # --- to implement -----------------------------------------------------------------------------------------------
    def used_modules(self, model, args) -> list:
        raise NotImplementedError

    # --- loss -------------------------------------------------------------------------------------------------------
    def step_generator(self, per_rank: bool) -> torch.Generator:
        """Generator for this micro-batch: training keys on (seed, global step, micro-step), so a run resumed at a
        checkpoint draws what the uninterrupted run drew; evaluation keys on the batch index within `evaluate()`, so
        every evaluation sees the same draws and losses are comparable. `per_rank` adds the process index (for draws
        over local data, e.g. masks); global draws (negatives over the gathered batch) must be equal on all ranks."""
        rank = world()[0] if per_rank else 0
        if self.model.training:
            step = self.state.global_step
            self._micro = (step, self._micro[1] + 1 if self._micro[0] == step else 0)
            return seeded_generator(self.args.seed, "train", step, self._micro[1], rank)
        self._eval_batches += 1
        return seeded_generator(self.args.seed, "eval", self._eval_batches, rank)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's own loss, with this step's seeded generator; its parts are kept for `log`."""
        inputs = {k: v for k, v in inputs.items() if k != "cell_ids"}  # bookkeeping only
        outputs = model(**inputs, generator=self.step_generator(per_rank=self.per_rank_draws))
        mode = "train" if model.training else "eval"
        for name, value in outputs.items():
            if name != "loss":
                self._metrics[mode][name].append(float(value.detach()))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss only: the stages have no predictions worth gathering."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, *args, **kwargs):
        self._eval_batches = 0
        return super().evaluate(*args, **kwargs)

    def log(self, logs: dict, start_time=None) -> None:
        """Adds the mean of each loss part since the last log, over the batches of all ranks."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        means = mean_over_ranks(self, self._metrics[mode], sorted(self._metrics[mode]))
        logs.update({prefix + name: value for name, value in means.items()})
        self._metrics[mode].clear()
        super().log(logs, start_time)


def regroup_optimizer(optimizer, groups: list[tuple[list[torch.nn.Parameter], float]]):
    """Moves each `(parameters, learning rate)` of `groups` out of the optimizer's groups into groups of their own at
    that rate (keeping the weight decay of the group it left); a rate of 0 leaves them where they are (they are
    frozen before). Call before the scheduler is made, which reads each group's `initial_lr`."""
    for params, rate in groups:
        ids = {id(p) for p in params}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in ids]
            if moved and rate > 0:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
                settings = {k: v for k, v in group.items() if k != "params"}
                optimizer.add_param_group({**settings, "params": moved, "lr": rate, "initial_lr": rate})
    return optimizer


def mean_over_ranks(trainer, parts: dict[str, list[float]], names) -> dict[str, float]:
    """Mean of each of `names` over the values that all ranks collected in `parts` since the last log; names no rank
    has values for are left out. Trainer calls `log` on every rank at the same step, and every rank must pass the
    same `names` (one all-reduce of a `(len(names), 2)` tensor of sums and counts)."""
    totals = [[sum(parts.get(name, ())), len(parts.get(name, ()))] for name in names]
    totals = torch.tensor(totals, dtype=torch.float64, device=trainer.args.device).reshape(-1, 2)
    if trainer.args.world_size > 1:
        totals = trainer.accelerator.reduce(totals, reduction="sum")
    return {name: total / count for name, (total, count) in zip(names, totals.tolist()) if count > 0}


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str):
    """Flushes every file and folder under `path`, so the rename never publishes data still in the page cache."""
    for root, _, files in os.walk(path):
        for file in files:
            with open(os.path.join(root, file), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


# --- example scripts --------------------------------------------------------------------------------------------------
def load_model_and_data(model_args, seed: int, model_class=None):
    """`(model, processor, datasets)` for the training entry points: a saved model (`model_name_or_path`) or the
    embedded default model, as `model_class` (default `ScMMGPTForConditionalGeneration`; `ScMMGPTForPreTraining`
    for the pre-training stages), and the cells `model_args` names (the embedded PBMC demo by default), read with
    *that model's* gene vocabulary (so gene ids agree)."""

    from modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTProcessor

    from .data import load_cell_text_splits, load_pbmc
    from .default_model import build_model

    model_class = model_class or ScMMGPTForConditionalGeneration
    if model_args.model_name_or_path:
        model = model_class.from_pretrained(model_args.model_name_or_path)
        processor = ScMMGPTProcessor.from_pretrained(model_args.model_name_or_path)
        processor.check_model_config(model.config)
    else:
        torch.manual_seed(seed)  # the demo model's random init
        model, processor = build_model(
            load_pbmc(),
            tiny_lm=model_args.demo_language_model == "tiny",
            num_cell_tokens=model_args.num_cell_tokens,
            model_class=model_class,
            **model_args.demo_model_options,
        )
    data = load_cell_text_splits(model_args, processor.feature_extractor.gene_vocab, seed)
    if "validation" not in data:
        raise ValueError(
            "Training needs validation cells: pass validation_data too, or pass only train_data to split "
            "it by split_fractions."
        )
    streaming = model_args.streaming
    if model_args.holdout_cell_types:
        held_out = set(model_args.holdout_cell_types)
        if not streaming:  # a stream is not read ahead to check the names
            unknown = held_out - set(data["train"]["cell_type"])
            if unknown:
                raise ValueError(f"holdout_cell_types {sorted(unknown)} are not cell types of the training split.")
        for split in ("train", "validation"):
            data[split] = data[split].filter(lambda r: r["cell_type"] not in held_out)
    if streaming:  # map-style splits are shuffled by the Trainer's sampler; a stream through a seeded buffer
        data["train"] = data["train"].shuffle(seed=seed, buffer_size=model_args.shuffle_buffer_size)
    for split, limit in (("train", model_args.max_train_samples), ("validation", model_args.max_eval_samples)):
        if limit is not None:
            data[split] = (
                data[split].take(limit) if streaming else data[split].select(range(min(limit, len(data[split]))))
            )
    if not model_args.model_name_or_path and model_args.gene_embedding_init == "pca":
        # From the training split only (after hold-outs), with exactly the encoder's inputs (a stream: its first
        # pca_cells cells).
        train = list(data["train"].take(model_args.pca_cells)) if streaming else data["train"][:]
        cells = processor.feature_extractor(train)
        base_model(model).cell_tower.init_cell_summary_from_pca(**cell_inputs(cells))
    return model.train(), processor, data


def parse_stage_args(parser, argv=None):
    """`HfArgumentParser` dataclasses from a YAML/JSON config (first argument) plus CLI overrides, or the CLI alone:
    `train_x.py config.yaml --max_steps 10`. The config becomes `--key value` flags, so later flags win."""
    import sys

    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    argv_source = argv[0] if argv and argv[0].endswith((".yaml", ".yml", ".json")) else None
    if argv_source:
        with open(argv[0], encoding="utf-8") as f:
            try:
                config = json.load(f) if argv[0].endswith(".json") else yaml.safe_load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{argv[0]}:{error.lineno}: not valid JSON ({error.msg}).") from error
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f"{argv[0]}:{mark.line + 1}" if mark is not None else argv[0]
                raise ValueError(f"{where}: not valid YAML ({getattr(error, 'problem', None) or error}).") from error
        if config is None:
            raise ValueError(f"{argv[0]} is empty: a stage config needs at least output_dir.")
        if not isinstance(config, dict):
            raise ValueError(f"{argv[0]}: expected a mapping of option: value, got a {type(config).__name__}.")
        known = {field.name for dtype in parser.dataclass_types for field in dataclasses.fields(dtype)}
        for key in config or {}:
            if key not in known:  # argparse would guess an abbreviation, or stop without naming the file
                close = difflib.get_close_matches(key, known, n=1)
                raise ValueError(
                    f"{argv[0]}: unknown option {key!r}" + (f"; did you mean {close[0]!r}?" if close else ".")
                )
        flags = []
        for key, value in (config or {}).items():
            if value is None:
                continue
            values = value if isinstance(value, list) else [value]
            flags += [f"--{key}", *(_flag_value(v) for v in values)]
        argv = flags + argv[1:]
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except argparse.ArgumentError as error:  # a parser made with exit_on_error=False: a value of the wrong type
        source = f"{argv_source}: " if argv_source else ""
        raise ValueError(f"{source}{error}") from error


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, dict) else str(value)
