"""Instruction stage on TRL's SFTTrainer: batches, response-only labels, LoRA choices, loss going down, merging."""

import itertools
import os
import re

import pytest
import torch
from conftest import tiny_demo

from trainers.data.instructions import instruction_examples
from trainers.instruction import ScMMGPTInstructionArguments, ScMMGPTInstructionCollator, ScMMGPTInstructionTrainer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return tiny_demo(tmp_path_factory.mktemp("hf"))


def _args(tmp_path, **overrides):
    defaults = dict(
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=5,
        save_strategy="no",
        use_cpu=True,
        lora_r=8,
        seed=0,
        max_steps=12,
        eval_strategy="no",
    )
    return ScMMGPTInstructionArguments(str(tmp_path), **{**defaults, **overrides})


def test_collator_labels_responses_and_routes_cells(demo):
    model, processor, splits = demo
    records = [splits["train"][i] for i in range(2)]
    batch = ScMMGPTInstructionCollator(processor)(records)
    assert batch["input_ids"].shape[0] == 6  # three tasks per cell
    assert batch["cell_gene_ids"].shape[0] == 4 and batch["target_cell_gene_ids"].shape[0] == 2
    assert "target_cell_expression" in batch
    tokenizer = processor.tokenizer
    examples = [e for r in records for e in instruction_examples(r)]
    for row, example in enumerate(examples):
        labelled = tokenizer.decode(batch["input_ids"][row][batch["labels"][row] != -100])
        if example["cell_role"] == "output":
            assert labelled == processor.cell_span.replace("><", "> <")
        else:
            assert re.findall(r"\w+", example["response"])[0].lower() in labelled.lower()
            assert "<cell_0>" not in labelled  # the cell read is never a target
    # Annotate-only batches read every cell and write none.
    only = ScMMGPTInstructionCollator(processor, tasks=["annotate"])(records)
    assert only["cell_gene_ids"].shape[0] == 2 and "target_cell_gene_ids" not in only


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="Unknown tasks"):
        ScMMGPTInstructionArguments(str(tmp_path), tasks=["translate"])
    with pytest.raises(ValueError, match="cell_encoder_mode"):
        ScMMGPTInstructionArguments(str(tmp_path), cell_encoder_mode="half")


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])  # both precision paths on any CPU
def test_instruction_tuning_lowers_validation_loss_with_lora(demo, tmp_path, bf16):
    from trainers.data import load_pbmc
    from trainers.default_model import build_model

    torch.manual_seed(0)
    model, _ = build_model(load_pbmc(), tiny_lm=True)  # a fresh model per precision
    _, processor, splits = demo
    before_lm = {n: p.detach().clone() for n, p in model.named_parameters() if "language_model" in n}
    before_encoder = {n: p.detach().clone() for n, p in model.model.cell_tower.cell_model.named_parameters()}
    validation = splits["validation"].select(range(24))
    args = _args(tmp_path, bf16=bf16, bridge_init="label_codebook", bridge_init_cells=64)
    trainer = ScMMGPTInstructionTrainer(model, args, processor, splits["train"], validation)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n and "language_model" in n for n in trainable)
    assert not any("cell_model" in n for n in trainable)
    for bridge in ("cell_head", "multi_modal_projector", "cell_codebook"):
        assert any(bridge in n for n in trainable), bridge
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"]
    for part in ("eval_lm_loss", "eval_cell_regression_loss", "eval_expression_loss"):
        assert part in after
    base = trainer.model.get_base_model()
    for name, value in base.model.cell_tower.cell_model.named_parameters():
        torch.testing.assert_close(value, before_encoder[name], msg="the frozen cell encoder changed")
    for name, value in base.named_parameters():
        if name in before_lm:  # LoRA leaves the LM's own weights as they were
            torch.testing.assert_close(value, before_lm[name])

    # Adapters save as safetensors; merging gives a full checkpoint with the adapted outputs.
    trainer.save_model(str(tmp_path / "adapter"))
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
    batch = ScMMGPTInstructionCollator(processor)([splits["test"][0]])
    # Compared in fp32: with bf16, accelerate wraps the trained model's forward in autocast, while the merged
    # checkpoint loads as a plain fp32 model.
    adapted_model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    with torch.no_grad():
        adapted = adapted_model(**batch).logits
    trainer.save_merged(str(tmp_path / "merged"))
    from modeling_scmmgpt import ScMMGPTForConditionalGeneration

    merged = ScMMGPTForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.cell_codebook_labels == sorted(set(splits["train"].select(range(64))["cell_type"]))
    assert not [f for f in os.listdir(tmp_path / "merged") if f.endswith((".bin", ".pt"))]
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted, atol=1e-4, rtol=1e-4)


def test_cell_encoder_lora_and_full_modes(demo, tmp_path):
    from trainers.default_model import build_model

    _, processor, splits = demo
    model, _ = build_model(__import__("trainers.data", fromlist=["load_pbmc"]).load_pbmc(), tiny_lm=True)
    trainer = ScMMGPTInstructionTrainer(
        model, _args(tmp_path, cell_encoder_mode="lora", qformer_mode="lora"), processor, splits["train"]
    )
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("cell_model" in n and "lora_A" in n and "o_proj" in n for n in names)
    assert any("qformer" in n and "lora_A" in n and "crossattention" in n for n in names)
    assert not any("qformer" in n and "lora_" not in n for n in names)
    model, _ = build_model(__import__("trainers.data", fromlist=["load_pbmc"]).load_pbmc(), tiny_lm=True)
    trainer = ScMMGPTInstructionTrainer(model, _args(tmp_path, qformer_mode="full"), processor, splits["train"])
    assert any("qformer" in n and "lora_" not in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    model, _ = build_model(__import__("trainers.data", fromlist=["load_pbmc"]).load_pbmc(), tiny_lm=True)
    trainer = ScMMGPTInstructionTrainer(
        model, _args(tmp_path, use_lora=False, cell_encoder_mode="full"), processor, splits["train"]
    )
    assert all(p.requires_grad for p in trainer.model.model.cell_tower.cell_model.parameters())
    assert not any(p.requires_grad for p in trainer.model.model.cell_tower.qformer.parameters())


def test_lora_modules_choose_the_adapted_layers(demo, tmp_path):
    from trainers.data import load_pbmc
    from trainers.default_model import build_model

    _, processor, splits = demo
    model, _ = build_model(load_pbmc(), tiny_lm=True)
    args = _args(tmp_path, lora_modules=["q_proj", "gate_proj", "down_proj"])
    trainer = ScMMGPTInstructionTrainer(model, args, processor, splits["train"])
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in trainer.model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "gate_proj", "down_proj"}


def test_balanced_cell_types_are_drawn_equally_often(demo, tmp_path):
    from collections import Counter

    from trainers.data import load_pbmc
    from trainers.default_model import build_model

    _, processor, splits = demo
    train = splits["train"]
    natural = Counter(train["cell_type"])
    assert max(natural.values()) > 5 * min(natural.values())  # the demo's types are far from balanced
    model, _ = build_model(load_pbmc(), tiny_lm=True)
    trainer = ScMMGPTInstructionTrainer(model, _args(tmp_path, balance_cell_types=1.0), processor, train)
    draws = [train[i]["cell_type"] for i in itertools.islice(iter(trainer._get_train_sampler()), 3000)]
    shares = [count / len(draws) for count in Counter(draws).values()]
    assert len(shares) == len(natural) and max(shares) < 1.5 / len(natural) and min(shares) > 0.5 / len(natural)
    again = [train[i]["cell_type"] for i in itertools.islice(iter(trainer._get_train_sampler()), 3000)]
    assert again == draws  # seeded: every rank, and every run, draws the same cells
    with pytest.raises(ValueError, match="balance_cell_types"):
        ScMMGPTInstructionArguments(str(tmp_path), use_cpu=True, balance_cell_types=2.0)
    with pytest.raises(ValueError, match="map-style"):
        ScMMGPTInstructionTrainer(
            model, _args(tmp_path, balance_cell_types=1.0), processor, train.to_iterable_dataset()
        )


def test_generation_length_fits_the_longest_training_response(demo, tmp_path):
    """Stage 3 saves a `max_new_tokens` that fits every description it trained on; the describe pipeline uses it."""
    from modeling_scmmgpt import ScMMGPTForConditionalGeneration
    from modeling_scmmgpt.pipelines import CellDescriptionPipeline
    from trainers.data import load_pbmc
    from trainers.default_model import build_model
    from trainers.instruction import response_token_budget

    _, processor, splits = demo
    train = splits["train"]
    longest = max(
        len(processor.tokenizer(d, add_special_tokens=False)["input_ids"]) for d in set(train["description"])
    )
    assert response_token_budget(processor, train) == longest + 16
    assert response_token_budget(processor, train.to_iterable_dataset(), max_streamed_cells=len(train)) == longest + 16
    model, _ = build_model(load_pbmc(), tiny_lm=True)
    assert model.generation_config.max_new_tokens is None
    ScMMGPTInstructionTrainer(model, _args(tmp_path), processor, train).save_merged(tmp_path / "merged")
    reloaded = ScMMGPTForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert reloaded.generation_config.max_new_tokens == longest + 16
    describer = CellDescriptionPipeline(model=reloaded, processor=processor, task=None)
    assert describer._sanitize_parameters()[1]["max_new_tokens"] == longest + 16
    assert describer._sanitize_parameters(max_new_tokens=5)[1]["max_new_tokens"] == 5
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="max_new_tokens"):
            describer(splits["test"].select(range(2)), max_new_tokens=bad, progress=False)


def test_generation_prompts_cycle_the_tuned_phrasings_per_type():
    """The evaluation and the figure ask for generated cells with the same prompts: per type, the phrasings the model
    was tuned on in turn, with a tissue suffix given once or per type."""
    from modeling_scmmgpt.prompts import GENERATE, generation_prompts

    prompts = generation_prompts(["B cell", "NK cell"], len(GENERATE) + 1, {"B cell": " from blood"})
    assert len(prompts) == 2 * (len(GENERATE) + 1)
    assert prompts[: len(GENERATE)] == [g.format(cell_type="B cell", tissue=" from blood") for g in GENERATE]
    assert prompts[len(GENERATE)] == prompts[0]  # the phrasings cycle
    assert prompts[-1] == GENERATE[0].format(cell_type="NK cell", tissue="")  # no suffix for a type without one
    assert generation_prompts(["T cell"], 1, " from lung") == [
        GENERATE[0].format(cell_type="T cell", tissue=" from lung")
    ]
