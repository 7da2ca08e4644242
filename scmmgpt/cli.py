"""The `scmmgpt` command: the demo, the pipelines on `.h5ad` files, training, evaluation, conversion and publishing.

Errors print one line and a hint (the traceback only with `--debug`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import textwrap


EXAMPLES = {
    "demo": "scmmgpt demo --output-dir scmmgpt_demo          # or --fast: tiny LM, fewer steps",
    "embed": "scmmgpt embed --model runs/demo/model --input pbmc.h5ad --output pbmc_embedded.h5ad",
    "annotate": "scmmgpt annotate --model runs/demo/model --input pbmc.h5ad --output labels.csv "
    "--labels CL:0000236 'natural killer cell' --top-k 2",
    "describe": "scmmgpt describe --model runs/demo/model --input pbmc.h5ad --output descriptions.csv",
    "generate": "scmmgpt generate --model runs/demo/model --prompt 'a B cell from blood' --n-cells 5 --output cells.h5ad",
    "init": "scmmgpt init --cell-encoder scgpt_converted/ --language-model SmolLM2.gguf --qformer all-MiniLM-L6-v2/ "
    "--num-cell-tokens 32 --output-dir model/",
    "train": "scmmgpt train --stage contrastive examples/configs/contrastive_tiny.yaml --max_steps 20\n"
    "  scmmgpt train --stage all --output-dir runs/pbmc examples/configs      # <stage>_tiny.yaml, chained",
    "evaluate": "scmmgpt evaluate --model runs/demo/model --output-json metrics.json     # the PBMC demo's test split\n"
    "  scmmgpt evaluate --model runs/mine/instruction --train-data train.h5ad --validation-data val.h5ad "
    "--test-data test.h5ad --label-column celltype --holdout-types 'B cell'",
    "convert-scgpt": "scmmgpt convert-scgpt path/to/scGPT_human out/cell_encoder",
    "push": "scmmgpt push --model runs/demo/model --repo-id me/scmmgpt-pbmc --eval-results metrics.json",
    "app": "scmmgpt app --model scmmgpt_demo/instruction --port 7860     # then open http://127.0.0.1:7860\n"
    "  scmmgpt app --write-space my_space --model me/scmmgpt-pbmc          # a Hugging Face Space's files",
}


class CLIError(Exception):
    """A user-facing error: `message` and a `hint` for the fix."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


# --- inputs and outputs -------------------------------------------------------------------------------------------
def _read_h5ad(path: str, backed: bool = False):
    from .files import read_h5ad

    if not os.path.isfile(path):
        raise CLIError(f"{path}: no such file.", "Check the --input path.")
    try:
        return read_h5ad(path, backed=backed)
    except ValueError as error:
        raise CLIError(str(error), "Pass an AnnData file written by anndata.") from None


def _load(model_dir: str, cls_name: str = "ScMMGPTForConditionalGeneration", **cell_processor_overrides):
    import modeling_scmmgpt as lib

    if not os.path.isdir(model_dir) or not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CLIError(
            f"{model_dir}: not a saved scMMGPT model folder.", "Pass the output folder of training or demo."
        )
    model = getattr(lib, cls_name).from_pretrained(model_dir).eval()
    processor = lib.ScMMGPTProcessor.from_pretrained(model_dir)
    for name, value in cell_processor_overrides.items():
        if value is not None:
            setattr(processor.feature_extractor, name, value)
    return model, processor


def _check_output(args, formats=(".h5ad", ".csv")) -> None:
    """Before any compute: a known format, an existing folder, and never the input file unless --overwrite."""
    output = args.output
    if not output.endswith(formats):
        raise CLIError(f"--output {output}: unknown format.", f"Use a {' or '.join(formats)} file name.")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise CLIError(
            f"--output {output}: the folder {folder} does not exist.", "Create it first, or write elsewhere."
        )
    source = getattr(args, "input", None)
    if (
        source
        and os.path.exists(output)
        and os.path.exists(source)
        and os.path.samefile(source, output)
        and not args.overwrite
    ):
        raise CLIError(
            f"--output {output} is the --input file.",
            "Write to a new file, or pass --overwrite to replace the input once the result is complete.",
        )
    _check_room(output, _expected_output_bytes(args))


def _expected_output_bytes(args) -> int:
    """A generous estimate of the output's size: an `.h5ad` output holds the whole input AnnData plus the results;
    embeddings up to 4 KiB a cell (1024 float32s), a table row up to 1 KiB; generated cells n_cells x 60k genes."""
    from .files import count_cells

    source, output = getattr(args, "input", None), args.output
    if source is None:  # generate
        size = getattr(args, "n_cells", 1) * 60_000 * 4
    elif output.endswith(".h5ad"):
        size = int(os.path.getsize(source) * 1.2) if os.path.isfile(source) else 0
    else:
        size = count_cells(source) * (4096 if output.endswith(".npy") else 1024)
    return size + (1 << 20)


def _check_room(output: str, needed: int) -> None:
    """Refuses before any compute when the output cannot fit: the free space of its file system, or the file-size
    limit of this process (`ulimit -f`). HDF5 that runs out of room part-way through a write can crash the process
    instead of raising, so a full disk must be caught here, not at the write."""
    import resource
    import shutil

    folder = os.path.dirname(os.path.abspath(output))
    free = shutil.disk_usage(folder).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    room = min(free, limit) if limit != resource.RLIM_INFINITY else free
    if room < needed:
        what = "free space" if room == free else "the file-size limit (ulimit -f)"
        raise CLIError(
            f"--output {output}: about {needed >> 20} MiB needed, {room >> 20} MiB allowed by {what}.",
            "Free some space, write to another disk, or raise the limit.",
        )


def _write_table(adata, columns: list[str], output: str) -> None:
    """`.h5ad` keeps the whole AnnData; `.csv` writes the cell ids and the new obs columns. Written to a temporary
    file and renamed into place, so the output (possibly the input file, with --overwrite) is never half written."""
    from modeling_scmmgpt.utils import atomic_output

    with atomic_output(output) as tmp:
        if output.endswith(".h5ad"):
            adata.write_h5ad(tmp)
        else:
            adata.obs[columns].to_csv(tmp, index_label="cell_id")


def _typical_genes(processor, adata, sample: int = 256) -> int:
    """About how many genes the input's cells have: the median over its first `sample` cells, rounded up to a
    multiple of 64 (so that nearby sizes reuse one cached fast-mode measurement). The fast mode measures its
    attention there: which kernel is fastest depends on the cells' length, and cells often express far fewer genes
    than `max_genes`."""
    cells = adata[: min(sample, adata.n_obs)]
    mask = processor.feature_extractor(cells.to_memory() if cells.isbacked else cells)["cell_attention_mask"]
    return int(math.ceil(float(mask.sum(1).float().median()) / 64) * 64)


def _cell_pipeline(task: str, args, adata):
    from transformers import pipeline

    use_raw = False if args.layer and args.use_raw is None else args.use_raw  # a layer named is the matrix to read
    model, processor = _load(
        args.model,
        gene_id_column=args.gene_id_column,
        layer=args.layer,
        use_raw=use_raw,
        min_vocab_coverage=args.min_vocab_coverage,
    )
    if args.fast:
        mode = model.enable_fast_mode(genes=_typical_genes(processor, adata))
        print(mode.describe(), file=sys.stderr)
    return pipeline(task, model=model, processor=processor)


# --- subcommands ----------------------------------------------------------------------------------------------------
def cmd_embed(args):
    _check_output(args, (".h5ad", ".npy"))
    # A .npy output streams from the file opened backed; only an .h5ad output needs the AnnData in memory.
    adata = _read_h5ad(args.input, backed=args.output.endswith(".npy"))
    extractor = _cell_pipeline("cell-feature-extraction", args, adata)
    if args.output.endswith(".npy"):
        extractor(args.input, batch_size=args.batch_size, output_file=args.output)
    else:
        extractor(adata, batch_size=args.batch_size, write_to_adata=True)
        _write_table(adata, [], args.output)
    print(f"Embedded {adata.n_obs} cells -> {args.output}")


def cmd_annotate(args):
    _check_output(args)
    adata = _read_h5ad(args.input)
    annotator = _cell_pipeline("cell-type-annotation", args, adata)
    results = annotator(
        adata,
        candidate_labels=args.labels,
        top_k=args.top_k,
        mode=args.mode,
        open_set=args.open_set,
        batch_size=args.batch_size,
        write_to_adata=True,
    )
    for k in range(1, len(results[0]) if results else 0):  # top_k may exceed the labels (the pipeline warns)
        adata.obs[f"scmmgpt_cell_type_{k + 1}"] = [r[k]["label"] for r in results]
        adata.obs[f"scmmgpt_cell_type_{k + 1}_score"] = [r[k]["score"] for r in results]
    columns = [c for c in adata.obs.columns if c.startswith("scmmgpt_cell_type")]
    _write_table(adata, columns, args.output)
    print(f"Annotated {adata.n_obs} cells -> {args.output}")


def cmd_describe(args):
    _check_output(args)
    adata = _read_h5ad(args.input)
    describer = _cell_pipeline("cell-description", args, adata)
    describer(adata, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, write_to_adata=True)
    _write_table(adata, ["scmmgpt_description"], args.output)
    print(f"Described {adata.n_obs} cells -> {args.output}")


def cmd_generate(args):
    from transformers import pipeline

    from modeling_scmmgpt.utils import atomic_output

    _check_output(args)
    model, processor = _load(args.model)
    cells = pipeline("text-to-cell", model=model, processor=processor)(
        args.prompt, n_cells=args.n_cells, seed=args.seed, max_text_tokens=args.max_text_tokens
    )
    with atomic_output(args.output) as tmp:
        if args.output.endswith(".h5ad"):
            cells.write_h5ad(tmp)
        else:
            cells.to_df().join(cells.obs).to_csv(tmp, index_label="cell_id")
    print(f"Generated {cells.n_obs} cells over {cells.n_vars} genes -> {args.output}")


def cmd_init(args):
    """A new model from parts: a cell encoder folder, a causal LM (folder or GGUF file) and optionally a BERT for
    the Q-Former; saved (model and processor) to a new folder in one rename, so `train` can start from it."""
    import json
    import shutil
    import tempfile

    from modeling_scmmgpt import ScMMGPTForConditionalGeneration

    for flag, path in (
        ("--cell-encoder", args.cell_encoder),
        ("--language-model", args.language_model),
        ("--qformer", args.qformer),
    ):
        if path is not None and not os.path.exists(path):
            raise CLIError(
                f"{flag} {path}: no such file or folder.", "Parts load from local paths; nothing is downloaded."
            )
    if not os.path.isfile(os.path.join(args.cell_encoder, "config.json")):
        raise CLIError(
            f"--cell-encoder {args.cell_encoder}: no config.json there.",
            "Pass a folder written by `scmmgpt convert-scgpt` or ScMMGPTCellModel.save_pretrained.",
        )
    if os.path.exists(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite:
        raise CLIError(
            f"--output-dir {args.output_dir} exists and is not empty.", "Pick a new folder, or pass --overwrite."
        )
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--option {item}: expected KEY=VALUE.", "e.g. --option cell_summary=true")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a bare string
    language_model, gguf_file = args.language_model, None
    if language_model.endswith(".gguf"):
        language_model, gguf_file = os.path.dirname(os.path.abspath(language_model)), os.path.basename(language_model)
    model, processor = ScMMGPTForConditionalGeneration.from_pretrained_parts(
        language_model,
        args.cell_encoder,
        qformer=args.qformer,
        gguf_file=gguf_file,
        num_cell_tokens=args.num_cell_tokens,
        **options,
    )
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".init-", dir=parent)  # same file system: the rename is atomic
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if os.path.exists(args.output_dir):
            shutil.rmtree(args.output_dir)
        os.replace(staging, args.output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    vocab = processor.feature_extractor.gene_vocab
    print(
        f"Saved a new scMMGPT ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{model.config.num_cell_tokens} cell tokens, {len(vocab)} genes in the encoder's vocabulary) -> {args.output_dir}"
    )


def cmd_train(args):
    from trainers.run import STAGES, parse_stage_for_plan, plan_stage, pretrain_all, run_stage

    if args.stage == "all":  # each stage has its own config; the stages chain through OUTPUT_DIR/<stage>
        configs = {stage: os.path.join(args.config, f"{stage}_{args.suffix}.yaml") for stage in STAGES}
        missing = [path for path in configs.values() if not os.path.isfile(path)]
        if missing:
            raise CLIError(
                f"{missing[0]}: no such config file.",
                "With --stage all, pass a folder holding <stage>_<suffix>.yaml for each stage, e.g. examples/configs.",
            )
        if not args.output_dir:
            raise CLIError("--stage all needs --output-dir.", "Each stage is saved in OUTPUT_DIR/<stage>.")
        plans = pretrain_all(
            {stage: [path, *args.overrides] for stage, path in configs.items()}, args.output_dir, dry_run=args.dry_run
        )
        if args.dry_run:
            _print_plans(plans.values())
        return
    if args.stage not in STAGES:
        raise CLIError(f"--stage {args.stage}: unknown stage.", f"Choose from {', '.join(STAGES)} or all.")
    if not os.path.isfile(args.config):
        raise CLIError(
            f"{args.config}: no such config file.", "Pass a YAML or JSON file, e.g. examples/configs/*.yaml."
        )
    if args.dry_run:
        _print_plans([plan_stage(args.stage, parse_stage_for_plan(args.stage, [args.config, *args.overrides]))])
        return
    run_stage(args.stage, [args.config, *args.overrides])


def _print_plans(plans) -> None:
    import json

    for plan in plans:
        print(f"stage {plan['stage']}:")
        for key, value in plan.items():
            if key != "stage":
                print(f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    print("(dry run: nothing was loaded, read or trained)")


def cmd_evaluate(args):
    from trainers.arguments import ScMMGPTDataArguments

    from .evaluation import ScMMGPTEvaluationArguments, run_evaluation

    if not args.model:
        raise CLIError(
            "evaluate needs --model.", "Pass the output folder of training (its instruction stage) or of the demo."
        )
    run_evaluation(_dataclass_from(ScMMGPTEvaluationArguments, args), _dataclass_from(ScMMGPTDataArguments, args))


def _dataclass_from(cls, namespace):
    """A dataclass from the parsed options its fields added (see `_dataclass_options`); its checks run here."""
    import dataclasses

    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.init})


def _evaluation_options() -> argparse.ArgumentParser:
    from trainers.arguments import ScMMGPTDataArguments

    from .evaluation import ScMMGPTEvaluationArguments

    return _dataclass_options(ScMMGPTEvaluationArguments, ScMMGPTDataArguments)


def _dataclass_options(*classes) -> argparse.ArgumentParser:
    """The options of dataclasses, as transformers' HfArgumentParser defines them (each as --name and --kebab-name),
    to be a subcommand's parent parser."""
    from transformers import HfArgumentParser

    return HfArgumentParser(classes, add_help=False)


def cmd_convert_scgpt(args):
    from modeling_scmmgpt.convert_scgpt import convert_scgpt_checkpoint

    if not os.path.exists(args.checkpoint):
        raise CLIError(
            f"{args.checkpoint}: no such scGPT checkpoint.",
            "Pass the folder with best_model.pt, args.json and vocab.json.",
        )
    model, processor, report = convert_scgpt_checkpoint(args.checkpoint, output_dir=args.output_dir)
    print(f"Converted {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {args.output_dir}")
    if report.unused:
        print(f"Not part of the encoder, left out: {', '.join(report.unused)}")


def cmd_push(args):
    from modeling_scmmgpt.hub import push_to_hub

    model, processor = _load(args.model)
    info = push_to_hub(model, processor, args.repo_id, eval_results=args.eval_results, private=args.private)
    print(f"Pushed to {getattr(info, 'commit_url', args.repo_id)}")


def cmd_app(args):
    from .app import serve, write_space

    if args.write_space:
        for path in write_space(args.write_space, args.model):
            print(f"Wrote {path}")
        print(f"Upload it: huggingface-cli upload --repo-type space <you>/<space> {args.write_space}")
        return
    if os.path.exists(args.model) and not os.path.isfile(os.path.join(args.model, "config.json")):
        raise CLIError(
            f"{args.model}: not a saved scMMGPT model folder.", "Pass the output folder of training or demo."
        )
    if args.max_cells < 1:
        raise CLIError(f"--max-cells {args.max_cells}: need at least 1.", "e.g. --max-cells 2000")
    serve(args.model, port=args.port, host=args.host, max_cells=args.max_cells)


def cmd_demo(args):
    from .demo import run_demo

    run_demo(args.output_dir, fast=args.fast, seed=args.seed, holdout_types=args.holdout_types)


# --- parser ---------------------------------------------------------------------------------------------------------
def _add_cell_io(sub, output_help: str):
    sub.add_argument("--model", required=True, help="saved scMMGPT folder")
    sub.add_argument("--input", required=True, help=".h5ad file of cells")
    sub.add_argument("--output", required=True, help=output_help)
    sub.add_argument("--batch-size", type=int, default=64)
    sub.add_argument("--gene-id-column", help="var column with gene symbols or Ensembl IDs (default: var_names)")
    sub.add_argument("--layer", help="read this layer instead of X (and not adata.raw, unless --use-raw)")
    sub.add_argument(
        "--use-raw",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read adata.raw, or not (default: as the model was saved)",
    )
    sub.add_argument(
        "--min-vocab-coverage",
        type=_fraction,
        default=None,
        help="refuse inputs that measure less of the model's genes (or whose genes the model knows "
        "less of, for a model with more genes than the input); default: as saved, usually 0.5",
    )
    sub.add_argument(
        "--overwrite",
        action="store_true",
        help="allow --output to be the --input file (replaced only once the result is complete)",
    )
    sub.add_argument(
        "--fast",
        action="store_true",
        help="run in the fast mode: bf16, the attention kernel and packing that a measurement on this machine, at "
        "the input cells' typical number of genes, found fastest (measured once, then cached; the choice is printed)",
    )


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1]")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line and a hint instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\nhint: `{self.prog} --help` lists the commands and options.\n")


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The `scmmgpt` parser. `evaluate` takes its options from the training dataclasses, which import transformers
    (seconds): they are added only when `argv` (default: the command line) holds the word `evaluate` anywhere (an
    option's value too, which only costs the import), so `scmmgpt --help` and the other commands start without
    them. To parse an `evaluate` command line, pass it here too."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _Parser(prog="scmmgpt", description="scMMGPT: joint single-cell and text language modelling.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subs = parser.add_subparsers(dest="command", metavar="command", required=True)

    def sub(name, help_text, parents=()):
        return subs.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=list(parents),
            allow_abbrev=False,
        )

    p = sub("demo", "Train scMMGPT on the embedded PBMC data through all three stages, evaluate it and plot.")
    p.add_argument("--output-dir", default="scmmgpt_demo")
    p.add_argument("--fast", action="store_true", help="tiny LM and fewer steps (CI)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and training")
    p.add_argument(
        "--holdout-types",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="bulk_labels kept out of all training; the evaluation then names those test cells zero-shot",
    )
    p.set_defaults(func=cmd_demo)

    p = sub("embed", "Cell embeddings into obsm['X_scmmgpt'] (.h5ad) or a .npy file streamed from a backed file.")
    _add_cell_io(p, ".h5ad or .npy")
    p.set_defaults(func=cmd_embed)

    p = sub("annotate", "Top-k cell types among --labels (Cell Ontology ids, labels or free text), with scores.")
    _add_cell_io(p, ".h5ad or .csv")
    p.add_argument("--labels", nargs="+", required=True, help="candidate cell types")
    p.add_argument("--mode", choices=["zero-shot", "generative"], default="zero-shot")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument(
        "--no-open-set",
        dest="open_set",
        action="store_const",
        const=False,
        default=None,
        help="zero-shot: rank every cell over all labels, even cells unlike any training cell (by default, when "
        "the labels include types the model never trained on, such cells are named among those types)",
    )
    p.set_defaults(func=cmd_annotate)

    p = sub("describe", "A generated text description per cell, in obs['scmmgpt_description'].")
    _add_cell_io(p, ".h5ad or .csv")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens per description (default: the model's generation config, else 64)",
    )
    p.set_defaults(func=cmd_describe)

    p = sub("generate", "Pseudo-cells from text prompts, as an AnnData over the model's genes.")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", nargs="+", required=True)
    p.add_argument("--n-cells", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-text-tokens", type=int, default=0, help="sampled tokens before the cell (varies cells)")
    p.add_argument("--output", required=True, help=".h5ad or .csv")
    p.set_defaults(func=cmd_generate)

    p = sub(
        "init", "A new model from your parts: cell encoder, causal LM and a BERT for the Q-Former; saved for `train`."
    )
    p.add_argument(
        "--cell-encoder", required=True, help="cell-encoder folder (from convert-scgpt, or a ScMMGPTCellModel)"
    )
    p.add_argument("--language-model", required=True, help="causal-LM folder, or a .gguf file")
    p.add_argument(
        "--qformer", help="BERT folder initialising the Q-Former and its tokenizer (default: a random Q-Former)"
    )
    p.add_argument("--num-cell-tokens", type=int, default=32, help="Q-Former queries: the cell tokens the LM reads")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="further ScMMGPTConfig fields, JSON values (e.g. cell_summary=true for a random encoder)",
    )
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    p.set_defaults(func=cmd_init)

    p = sub("train", "Run one training stage, or all three in order, from a YAML/JSON config.")
    p.add_argument("--stage", required=True, help="contrastive, reconstruction, instruction or all")
    p.add_argument("--output-dir", help="with --stage all: the stages go to OUTPUT_DIR/<stage>")
    p.add_argument("--suffix", default="tiny", help="with --stage all: read CONFIG/<stage>_<suffix>.yaml")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print each stage's resolved plan (data, model, steps, output) and train nothing",
    )
    p.add_argument("config", help="YAML or JSON file of the stage's arguments (with --stage all, their folder)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="further --flag value pairs")
    p.set_defaults(func=cmd_train)

    p = sub(
        "evaluate",
        "The paper's three evaluations on held-out cells (yours, or the PBMC demo's test split), next "
        "to baselines fit on the training cells.",
        parents=[_evaluation_options()] if "evaluate" in argv else [],
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub("convert-scgpt", "Convert scGPT's best_model.pt/args.json/vocab.json into a safetensors cell encoder.")
    p.add_argument("checkpoint")
    p.add_argument("output_dir")
    p.set_defaults(func=cmd_convert_scgpt)

    p = sub("push", "Publish a model folder to the Hub: safetensors, processor files and a model card.")
    p.add_argument("--model", required=True)
    p.add_argument("--repo-id", required=True)
    p.add_argument("--eval-results", help="metrics JSON from `scmmgpt evaluate` for the card's model-index")
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=cmd_push)

    from .app import DEFAULT_MAX_CELLS

    p = sub("app", "A web app (Gradio) to annotate, describe and generate cells in the browser; or a Space's files.")
    p.add_argument("--model", required=True, help="saved scMMGPT folder, or a Hub repo id (downloaded once)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument(
        "--max-cells", type=int, default=DEFAULT_MAX_CELLS, help="largest upload, in cells (the CLI takes any size)"
    )
    p.add_argument("--write-space", metavar="FOLDER", help="write a Hugging Face Space serving --model, and exit")
    p.set_defaults(func=cmd_app)
    return parser


def _hint(message: str) -> str:
    if "not in the vocabulary" in message or re.search(r"measures \d+ of the model's \d+ genes", message):
        return (
            "--gene-id-column names the var column with gene symbols (or Ensembl IDs the model knows); "
            "--use-raw or --layer pick the matrix; --min-vocab-coverage accepts less."
        )
    if "connect" in message.lower() or "resolve" in message.lower() or "name or service" in message.lower():
        return "the Hub could not be reached: check the network, HF_ENDPOINT and your token (huggingface-cli login)."
    if "adata.raw is empty" in message:
        return "this model reads adata.raw; store log-normalised values there, or read X (--no-use-raw) or a layer (--layer)."
    return "run again with --debug for the full traceback."


def _library_errors() -> tuple[type[BaseException], ...]:
    """Errors of the libraries underneath that are about the user's files or network, not our code: a pickle that
    `torch.load(weights_only=True)` refuses, a safetensors file that does not deserialise, and the Hub's HTTP client
    failing to connect (huggingface_hub's own errors are OSErrors; its client's, `httpx2`, are not)."""
    import pickle

    import httpx2
    from safetensors import SafetensorError

    return pickle.UnpicklingError, SafetensorError, httpx2.HTTPError


@contextlib.contextmanager
def _quiet(debug: bool):
    """Without --debug, our own progress bars and warnings stay; library loading chatter, deprecation notices and
    the datasets' "Generating train split" bars go. Restored afterwards, for callers of `main()` from Python."""
    if debug:
        yield
        return
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity, hf_bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    datasets = sys.modules.get("datasets")  # already imported (main() called from Python): the variable came late
    bars = datasets is not None and datasets.is_progress_bar_enabled()
    if bars:
        datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if hf_bars:
            hf_logging.enable_progress_bar()
        if bars:
            datasets.enable_progress_bars()


def main(argv=None) -> int:
    args = build_parser(argv).parse_args(argv)
    try:
        with _quiet(args.debug):
            args.func(args)
    except CLIError as error:
        if args.debug:
            raise
        print(f"scmmgpt {args.command}: error: {error}", file=sys.stderr)
        if error.hint:
            print(f"hint: {error.hint}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, OSError, *_library_errors()) as error:  # Hub and network errors are OSErrors
        if args.debug:
            raise
        message = str(error).strip("'\"").splitlines()[0] if str(error) else type(error).__name__
        print(f"scmmgpt {args.command}: error: {textwrap.shorten(message, 400)}", file=sys.stderr)
        print(f"hint: {_hint(message)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
