"""Running the stages from configs: every config key is a real argument, and pretrain_all chains the three stages,
lowers each stage's validation loss, writes loadable safetensors models and reuses finished stages."""

import glob
import os

import pytest
import yaml
from transformers import HfArgumentParser

from trainers.arguments import ScMMGPTModelDataArguments
from trainers.run import STAGES, pretrain_all


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "*_*.yaml")))


@pytest.mark.parametrize(
    "path", [c for c in CONFIGS if os.path.basename(c).split("_")[0] in STAGES], ids=os.path.basename
)
def test_config_keys_are_arguments(path):
    stage = os.path.basename(path).split("_")[0]
    fields = set()
    for cls in (ScMMGPTModelDataArguments, STAGES[stage]):
        fields |= set(cls.__dataclass_fields__)
    with open(path, encoding="utf-8") as f:
        keys = set(yaml.safe_load(f))
    assert keys <= fields, f"unknown keys in {os.path.basename(path)}: {sorted(keys - fields)}"
    HfArgumentParser((ScMMGPTModelDataArguments, STAGES[stage]))  # the parser builds for these classes


def test_misspelled_or_malformed_config_is_refused_by_name(tmp_path):
    """A misspelled key is not taken as an abbreviation of another option (argparse's default): it is refused, with
    the file, the key and the closest option; so is a config that is not a mapping, or a misspelled flag."""
    from trainers.common import parse_stage_args

    parser = HfArgumentParser((ScMMGPTModelDataArguments, STAGES["contrastive"]), allow_abbrev=False)
    config = tmp_path / "typo.yaml"
    config.write_text("output_dir: out\nlearning_rat: 0.01\n")
    with pytest.raises(ValueError, match="typo.yaml: unknown option 'learning_rat'; did you mean 'learning_rate'"):
        parse_stage_args(parser, [str(config)])
    config.write_text("- output_dir\n- out\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        parse_stage_args(parser, [str(config)])
    config.write_text("output_dir: out\n")
    with pytest.raises(ValueError, match="not used.*--learning_rat"):  # refused, not applied as --learning_rate
        parse_stage_args(parser, [str(config), "--learning_rat", "0.01"])
    model_args, args = parse_stage_args(parser, [str(config), "--learning_rate", "0.01"])
    assert args.learning_rate == 0.01


def test_pretrain_all_chains_stages_and_reuses_them(tmp_path, capsys):
    from modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTProcessor

    configs = {stage: os.path.join(ROOT, "examples", "configs", f"{stage}_tiny.yaml") for stage in STAGES}
    overrides = [
        "--max_steps",
        "6",
        "--save_steps",
        "3",
        "--max_train_samples",
        "48",
        "--max_eval_samples",
        "16",
        "--data_cache_dir",
        str(tmp_path / "cache"),
        "--disable_tqdm",
        "true",
    ]
    stage_argv = {stage: [config, *overrides] for stage, config in configs.items()}
    stage_argv["instruction"] += ["--use_lora", "true"]  # the tiny config fine-tunes its random LM in full
    # The demo model's batch-normalised contrastive heads centre the features before the projections have adapted:
    # after 6 steps the validation loss is still above its start (2.81 -> 2.88), after 15 it is below (2.64).
    stage_argv["contrastive"] += ["--max_steps", "15"]
    results = pretrain_all(stage_argv, str(tmp_path / "runs"))
    for stage in STAGES:
        assert results[stage]["after"]["eval_loss"] < results[stage]["before"]["eval_loss"], stage
        folder = tmp_path / "runs" / stage
        assert (folder / "model.safetensors").exists() and (folder / "training_args.json").exists()
        # Checkpoint folders keep Trainer's resume state; the published model folder holds no pickle.
        published = list(folder.glob("*")) + list(folder.glob("adapter/*"))
        assert not [f.name for f in published if f.suffix in (".bin", ".pt", ".pth")]
    final = tmp_path / "runs" / "instruction"
    assert (final / "adapter" / "adapter_model.safetensors").exists()
    model = ScMMGPTForConditionalGeneration.from_pretrained(final)  # merged: a plain scMMGPT, no PEFT needed
    processor = ScMMGPTProcessor.from_pretrained(final)
    assert model.config.cell_token_index == processor.cell_token_id

    # A second run reuses every finished stage (nothing is retrained).
    stamp = os.path.getmtime(final / "model.safetensors")
    again = pretrain_all(stage_argv, str(tmp_path / "runs"))
    assert again["instruction"]["after"]["eval_loss"] == results["instruction"]["after"]["eval_loss"]
    assert os.path.getmtime(final / "model.safetensors") == stamp

    # The example script's report on the test split: annotation before and after stage 3, descriptions, generation.
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "pretrain_all_example", os.path.join(ROOT, "examples", "pretrain_all.py")
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    capsys.readouterr()
    report = example.report(str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    printed = capsys.readouterr().out
    for phase in ("before stage 3", "after stage 3"):
        for mode in ("zero-shot", "generative"):
            assert 0 <= report[phase][f"model_{mode}"]["accuracy"] <= 1
            assert f"{phase}, {mode:>10}: accuracy {report[phase][f'model_{mode}']['accuracy']:.3f}" in printed
    assert len(report["descriptions"]) == 3 and printed.count("described:") == 3
    assert report["generation"]["baseline_class_mean_plus_noise"] > 0.5 and "5-NN accuracy" in printed
