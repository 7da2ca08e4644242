import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tester import TEXT_CONFIGS, ScMMGPTModelTester, grad_norms
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from modeling_scmmgpt import ScMMGPTConfig, ScMMGPTForConditionalGeneration, ScMMGPTModel, ScMMGPTProcessor
from modeling_scmmgpt.processing_scmmgpt import cell_inputs


PARTS = {
    "cell encoder": "model.cell_tower.cell_model.",
    "q-former": "model.cell_tower.qformer.",
    "query tokens": "model.cell_tower.query_tokens",
    "cell-to-LM projector": "model.multi_modal_projector.",
    "language model": "model.language_model.",
    "LM-to-cell head": "cell_head.",
    "expression decoder": "model.expression_decoder.",
}


@pytest.fixture
def tester(pbmc_cell_processor, tokenizer):
    return ScMMGPTModelTester(pbmc_cell_processor, tokenizer)


def _joint_batch(tester, pbmc):
    """Two cells read (cell to text) and two cells written (text to cell), in one batch."""
    describe, describe_labels = tester.describe_inputs(pbmc[:2])
    write, write_labels = tester.generate_inputs(pbmc[2:4])
    tok = tester.processor.tokenizer
    width = max(describe["input_ids"].shape[1], write["input_ids"].shape[1])

    def pad(x, value):
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    batch = {
        "input_ids": torch.cat(
            [pad(describe["input_ids"], tok.pad_token_id), pad(write["input_ids"], tok.pad_token_id)]
        ),
        "attention_mask": torch.cat([pad(describe["attention_mask"], 0), pad(write["attention_mask"], 0)]),
        "labels": torch.cat([pad(describe_labels, -100), pad(write_labels, -100)]),
    }
    batch.update({k: v for k, v in describe.items() if k.startswith("cell_")})
    batch.update({k: v for k, v in write.items() if k.startswith("target_cell_")})
    return batch


@pytest.mark.parametrize("text_model_type", sorted(TEXT_CONFIGS))
def test_forward_losses_and_gradients_on_real_cells(pbmc, pbmc_cell_processor, tokenizer, text_model_type):
    tester = ScMMGPTModelTester(pbmc_cell_processor, tokenizer, text_model_type=text_model_type)
    model = ScMMGPTForConditionalGeneration(tester.get_config())
    assert type(model.model.language_model).__name__.lower().startswith(text_model_type)
    out = model(**_joint_batch(tester, pbmc))
    for part in ("lm_loss", "cell_regression_loss", "expression_loss"):
        value = getattr(out, part)
        assert value is not None and torch.isfinite(value), part
    expected = out.lm_loss + out.cell_regression_loss + out.expression_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    for name, prefix in PARTS.items():
        assert sum(grad_norms(model, prefix)) > 0, f"no gradient reaches the {name}"


def test_frozen_parts_get_no_gradient(pbmc, tester):
    tester.config_overrides = {"freeze_cell_encoder": True, "freeze_qformer": True}
    model = ScMMGPTForConditionalGeneration(tester.get_config())
    model(**_joint_batch(tester, pbmc)).loss.backward()
    for prefix in (PARTS["cell encoder"], PARTS["q-former"], PARTS["query tokens"]):
        assert sum(grad_norms(model, prefix)) == 0
    assert sum(grad_norms(model, PARTS["cell-to-LM projector"])) > 0
    assert sum(grad_norms(model, PARTS["language model"])) > 0


def test_input_cells_change_the_lm(pbmc, tester):
    model = ScMMGPTForConditionalGeneration(tester.get_config()).eval()
    inputs, _ = tester.describe_inputs(pbmc[:1])
    other = tester.processor(text=tester.processor.build_prompt("Describe this cell."), cells=pbmc[300:301])
    with torch.no_grad():
        a = model(**inputs).logits[:, -1]
        b = model(**{**inputs, **{k: v for k, v in other.items() if k.startswith("cell_")}}).logits[:, -1]
        as_tuple = model(**inputs, return_dict=False)  # transformers' @can_return_tuple
    assert not torch.allclose(a, b)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0][:, -1], a)


def test_mismatched_placeholders_raise(pbmc, tester):
    model = ScMMGPTForConditionalGeneration(tester.get_config())
    inputs = tester.processor(text=tester.processor.build_prompt("Describe this cell."), cells=pbmc[:1])
    two_cells = tester.processor.feature_extractor(pbmc[:2])
    with pytest.raises(ValueError, match="1 spans of 4.*2 cells"):
        model(
            input_ids=inputs["input_ids"],
            cell_gene_ids=two_cells["cell_gene_ids"],
            cell_values=two_cells["cell_values"],
        )
    with pytest.raises(ValueError, match="1 '<cell>' placeholders but 2 cells"):
        tester.processor(text="<cell> describe", cells=pbmc[:2])


def test_save_load_roundtrip_with_auto_classes(pbmc, tester, tmp_path):
    model = ScMMGPTForConditionalGeneration(tester.get_config()).eval()
    model.save_pretrained(tmp_path)
    tester.processor.save_pretrained(tmp_path)
    weights = [f for f in os.listdir(tmp_path) if f.endswith((".safetensors", ".bin", ".pt", ".pth", ".pkl"))]
    assert weights == ["model.safetensors"]

    assert isinstance(AutoConfig.from_pretrained(tmp_path), ScMMGPTConfig)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, ScMMGPTForConditionalGeneration)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, ScMMGPTProcessor)

    inputs, _ = tester.describe_inputs(pbmc[:3])
    again = processor(text=processor.tokenizer.batch_decode(inputs["input_ids"]), cells=pbmc[:3])
    for key in inputs:
        if key != "input_ids" and key != "attention_mask":
            assert torch.equal(inputs[key], again[key]), key
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name

    base = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(base, ScMMGPTModel)
    with torch.no_grad():
        torch.testing.assert_close(
            base(**inputs).last_hidden_state, model.model(**inputs).last_hidden_state, rtol=0, atol=0
        )


def test_tied_lm_head_survives_save_load(pbmc_cell_processor, tokenizer, tmp_path):
    tester = ScMMGPTModelTester(pbmc_cell_processor, tokenizer, text_model_type="gpt2")
    model = ScMMGPTForConditionalGeneration(tester.get_config())
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    reloaded = ScMMGPTForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()


def test_generate_text_from_real_cells_uses_cells_once(pbmc, tester):
    model = ScMMGPTForConditionalGeneration(tester.get_config()).eval()
    inputs = tester.processor(text=[tester.processor.build_prompt("Describe this cell.")] * 2, cells=pbmc[:2])
    calls = []
    hook = model.model.cell_tower.register_forward_hook(lambda *args: calls.append(1))
    # A random LM may emit <cell_i> placeholders, which the full pass below would read as cells to fill in.
    placeholders = list(model.config.cell_token_ids)
    out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, suppress_tokens=placeholders)
    hook.remove()
    assert out.shape == (2, inputs["input_ids"].shape[1] + 6)
    texts = tester.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) and t.strip() for t in texts)
    assert len(calls) == 1, "cells must be encoded at prefill only"
    # Cached generation equals a full forward pass over the generated sequence.
    with torch.no_grad():
        full = (
            model(
                input_ids=out[:, :-1],
                attention_mask=torch.ones_like(out[:, :-1]) * 0
                + (out[:, :-1] != tester.processor.tokenizer.pad_token_id),
                **{k: v for k, v in inputs.items() if k.startswith("cell_")},
            )
            .logits[:, -1]
            .argmax(-1)
        )
    assert torch.equal(full, out[:, -1])


def test_generate_cells_depends_on_prompt(pbmc, tester):
    model = ScMMGPTForConditionalGeneration(tester.get_config()).eval()
    processor = tester.processor
    prompts = [
        processor.build_prompt("Generate a cell of type monocyte.", with_cell=False),
        processor.build_prompt("Generate a cell of type B cell.", with_cell=False),
    ]
    inputs = processor(text=prompts)
    genes = torch.arange(10, 40)
    out = model.generate_cells(inputs["input_ids"], genes, attention_mask=inputs["attention_mask"])
    assert out.expression.shape == (2, 30)
    assert out.cell_queries.shape == (2, tester.num_cell_tokens, 32)
    assert torch.isfinite(out.expression).all()
    assert not torch.allclose(out.expression[0], out.expression[1])
    # The cell tokens come from the LM's own hidden states at the generated span.
    span = out.sequences[:, -tester.num_cell_tokens - 2 :]
    assert span[:, 0].eq(processor.cell_start_token_id).all() and span[:, -1].eq(processor.cell_end_token_id).all()


def test_cell_features_do_not_depend_on_batch(pbmc, tester):
    model = ScMMGPTModel(tester.get_config()).eval()
    cp = tester.processor.feature_extractor
    single = cp(pbmc[5:6])
    batch = cp(pbmc[[0, 5, 17, 400, 699]])
    with torch.no_grad():
        alone = model.get_cell_features(**cell_inputs(single))
        within = model.get_cell_features(**cell_inputs(batch))
    assert batch["cell_gene_ids"].shape[1] >= single["cell_gene_ids"].shape[1]
    torch.testing.assert_close(alone[0], within[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(within.norm(dim=-1), torch.ones(5))


def test_text_features_are_normalised(tester):
    model = ScMMGPTModel(tester.get_config()).eval()
    ids = torch.randint(1, 64, (3, 7))
    feats = model.get_text_features(ids, torch.ones_like(ids))
    assert feats.shape == (3, 16)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))


def test_text_features_do_not_depend_on_padding_side_or_batch(tester):
    model = ScMMGPTModel(tester.get_config()).eval()
    short, long = torch.randint(1, 64, (1, 4)), torch.randint(1, 64, (1, 9))
    alone = model.get_text_features(short, torch.ones_like(short))
    for side in ("left", "right"):
        pad = torch.zeros(1, 5, dtype=torch.long)
        ids = torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1)
        mask = (torch.arange(9) >= 5 if side == "left" else torch.arange(9) < 4).long()[None]
        batched = model.get_text_features(torch.cat([ids, long]), torch.cat([mask, torch.ones_like(mask)]))
        torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-5)


def test_lora_on_cell_encoder_trains_out_projection(pbmc, tester):
    model = ScMMGPTForConditionalGeneration(tester.get_config())
    config = LoraConfig(r=4, target_modules=r".*cell_model.*\.(q_proj|k_proj|v_proj|o_proj)", lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    batch = _joint_batch(tester, pbmc)
    peft_model(**batch).loss.backward()
    lora_b = {n: p.grad for n, p in peft_model.named_parameters() if "o_proj.lora_B" in n}
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b.values())


def test_model_matches_trl_layout(tester):
    """TRL's SFTTrainer calls model.model(...), reads .last_hidden_state and uses get_output_embeddings()."""
    model = ScMMGPTForConditionalGeneration(tester.get_config())
    ids = tester.processor(text=["cell type: B cell."])["input_ids"]
    hidden = model.model(input_ids=ids).last_hidden_state
    assert hidden.shape == (1, ids.shape[1], 32)
    assert model.get_output_embeddings() is model.lm_head
    assert isinstance(ScMMGPTForConditionalGeneration._tied_weights_keys, dict)


def test_generate_cells_accepts_either_padding_side(tester):
    model = ScMMGPTForConditionalGeneration(tester.get_config()).eval()
    processor = tester.processor
    prompts = [
        processor.build_prompt("Generate a cell of type monocyte.", with_cell=False),
        processor.build_prompt("Generate a cell.", with_cell=False),
    ]
    genes = torch.arange(5, 25)
    left = processor(text=prompts, padding_side="left")
    right = processor(text=prompts, padding_side="right")
    assert not torch.equal(left["input_ids"], right["input_ids"])
    a = model.generate_cells(left["input_ids"], genes, left["attention_mask"]).expression
    b = model.generate_cells(right["input_ids"], genes, right["attention_mask"]).expression
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_half_precision_load_runs_every_path(pbmc, tester, tmp_path):
    model = ScMMGPTForConditionalGeneration(tester.get_config())
    model.save_pretrained(tmp_path)
    for dtype in (torch.float16, torch.bfloat16):
        loaded = ScMMGPTForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype)
        assert loaded.model.multi_modal_projector.linear_1.weight.dtype == dtype
        if dtype == torch.float16:  # the Q-Former stays fp32 and its outputs must be cast for fp16 layers
            assert loaded.model.cell_tower.qformer.layernorm.weight.dtype == torch.float32
        out = loaded(**_joint_batch(tester, pbmc))
        assert torch.isfinite(out.loss)
        inputs, _ = tester.describe_inputs(pbmc[:2])
        features = loaded.get_cell_features(**cell_inputs(inputs))
        assert features.dtype == dtype


def test_labels_copied_from_input_ids_keep_input_cells(pbmc, tester):
    """A collator that sets labels = input_ids labels the cell spans it reads; without target cells they stay
    cells to read (so the cells change the LM loss), and no cell is expected as output."""
    model = ScMMGPTForConditionalGeneration(tester.get_config()).eval()
    inputs, _ = tester.describe_inputs(pbmc[:2])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    first = model(**inputs, labels=labels)
    others, _ = tester.describe_inputs(pbmc[2:4])
    second = model(**{**inputs, **{k: v for k, v in others.items() if k.startswith("cell_")}}, labels=labels)
    assert first.cell_regression_loss is None
    assert not torch.equal(first.logits, second.logits)


def test_target_cells_need_expression_and_survive_empty_cells(pbmc, tester):
    model = ScMMGPTForConditionalGeneration(tester.get_config())
    inputs, labels = tester.generate_inputs(pbmc[:2])
    without = {k: v for k, v in inputs.items() if k != "target_cell_expression"}
    with pytest.raises(ValueError, match="target_cell_expression"):
        model(**without, labels=labels)
    # A cell with no expressed gene (only <cls>) must give a finite expression loss, not NaN.
    empty = dict(inputs)
    empty["target_cell_attention_mask"] = torch.zeros_like(inputs["target_cell_attention_mask"])
    empty["target_cell_attention_mask"][:, 0] = 1
    assert torch.isfinite(model(**empty, labels=labels).expression_loss)


def test_cell_regression_target_is_fixed(pbmc, pbmc_cell_processor, tokenizer):
    """The target cell's Q-Former output is a fixed target: no gradient and no dropout noise in it."""
    tester = ScMMGPTModelTester(pbmc_cell_processor, tokenizer)
    config = tester.get_config()
    config.cell_config.dropout = 0.5
    model = ScMMGPTForConditionalGeneration(config).train()
    inputs, labels = tester.generate_inputs(pbmc[:2])
    inputs = {k: v for k, v in inputs.items() if k.startswith("target_cell_")}
    targets = [
        model._target_cell_queries(
            inputs["target_cell_gene_ids"], inputs["target_cell_values"], inputs["target_cell_attention_mask"]
        )
        for _ in range(2)
    ]
    torch.testing.assert_close(targets[0], targets[1])
    assert not targets[0].requires_grad
    assert model.model.cell_tower.cell_model.training  # modes restored


def test_gradient_accumulation_matches_the_full_batch(pbmc, tester, tmp_path):
    """Trainer must not treat our mean losses as sums: 2 x 2 accumulated equals one step on 4."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    inputs, labels = tester.describe_inputs(pbmc[:4])
    rows = Dataset.from_dict({**{k: v.tolist() for k, v in inputs.items()}, "labels": labels.tolist()})
    weights = []
    for batch, accumulation in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        model = ScMMGPTForConditionalGeneration(tester.get_config())
        args = TrainingArguments(
            tmp_path / f"b{batch}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=1e-2,
            optim="sgd",
            lr_scheduler_type="constant",
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            max_grad_norm=0.0,  # no clipping, which would hide the scale
        )
        Trainer(model=model, args=args, train_dataset=rows).train()
        weights.append(model.lm_head.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], atol=1e-6, rtol=1e-5)


def test_a_cell_tensor_keeps_one_name_from_the_processor_to_the_model(pbmc, tester):
    """The cell processor's `cell_*` names are the keywords of every entry point that reads cells (the encoder, the
    cell tower, the features, the cell tokens, the composite forward), and the written cells are `target_cell_*`."""
    feature_extractor = tester.processor.feature_extractor
    names = feature_extractor.model_input_names
    cells = feature_extractor(pbmc[:3])
    assert set(cells) == {*names, "cell_expression"} and all(name.startswith("cell_") for name in names)
    inputs = {name: cells[name] for name in names}
    model = ScMMGPTForConditionalGeneration(tester.get_config()).eval()
    prompt = tester.processor.build_prompt("Describe this cell.")
    composite = tester.processor(text=[prompt] * 3, cells=pbmc[:3])
    assert {k for k in composite if k.startswith("cell_")} == set(names)
    written = tester.processor(text=["<cell>"] * 3, target_cells=pbmc[:3])
    assert {k for k in written if k.startswith("target_")} == {f"target_{k}" for k in cells}
    with torch.no_grad():
        encoded = model.model.cell_tower.cell_model(**inputs).pooler_output
        tower = model.model.cell_tower(**inputs).encoder_pooler_output
        features = model.get_cell_features(**inputs)
        tokens = model.model.get_cell_token_embeddings(**inputs)
        logits = model(**composite).logits
    torch.testing.assert_close(encoded, tower)
    assert features.shape[0] == tokens.shape[0] == logits.shape[0] == 3


def test_the_package_exports_its_classes_once_each():
    """`__all__` is assembled from the modules' own lists: every name resolves, none twice, and `import *` binds the
    model family's classes (a module's `__all__` that names something the package does not import fails here)."""
    import modeling_scmmgpt
    from modeling_scmmgpt import configuration_scmmgpt, modeling_cell_encoder

    names = modeling_scmmgpt.__all__
    assert len(names) == len(set(names)) and all(hasattr(modeling_scmmgpt, name) for name in names)
    namespace = {}
    exec("from modeling_scmmgpt import *", namespace)
    expected = {*configuration_scmmgpt.__all__, *modeling_cell_encoder.__all__, "ScMMGPTForConditionalGeneration"}
    assert expected <= set(namespace) and {"ScMMGPTProcessor", "GeneVocab"} <= set(namespace)
