"""Publishing to the Hugging Face Hub: safetensors weights, processor files and a rendered model card."""

from __future__ import annotations

import json
import os
import tempfile

from huggingface_hub import EvalResult, ModelCard, ModelCardData, create_repo, upload_folder


WEIGHT_SUFFIXES_REFUSED = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def eval_results_from_json(results: dict | str) -> list[EvalResult]:
    """Model-index entries from the evaluation harness's JSON (a dict or a path):

    `{"dataset": {"name", "type", "split"}, "results": {task: {metric: value}}}`.
    """
    if isinstance(results, str):
        with open(results, encoding="utf-8") as f:
            results = json.load(f)
    dataset = results["dataset"]
    return [
        EvalResult(
            task_type=task,
            dataset_type=dataset["type"],
            dataset_name=dataset["name"],
            dataset_split=dataset.get("split"),
            metric_type=metric,
            metric_value=float(value),
        )
        for task, metrics in results["results"].items()
        for metric, value in metrics.items()
        if value is not None
    ]


def render_model_card(
    model,
    processor=None,
    repo_id: str = "scmmgpt-model",
    eval_results: dict | str | None = None,
    base_models: list[str] | None = None,
    datasets: list[str] | None = None,
    training: str = "Not described.",
    license: str = "apache-2.0",
) -> ModelCard:
    """A model card from `hub_cards/scmmgpt_model_card.md` with front matter (license, library_name, tags, base
    models, datasets, pipeline_tag) and, from the evaluation JSON, a `model-index` block."""
    from hub_cards import MODEL_CARD_TEMPLATE

    config = model.config
    results = eval_results_from_json(eval_results) if eval_results is not None else None
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["single-cell", "biology", "scRNA-seq", "scmmgpt", "multimodal"],
        base_model=base_models,
        datasets=datasets,
        model_name=repo_id.split("/")[-1],
        eval_results=results,
    )
    cell = config.cell_config
    text = config.text_config
    evaluation = (
        "| task | metric | value | dataset (split) |\n|---|---|---|---|\n"
        + "\n".join(
            f"| {r.task_type} | {r.metric_type} | {r.metric_value:.4g} | {r.dataset_name} ({r.dataset_split}) |"
            for r in results
        )
        if results
        else "Not evaluated yet."
    )
    input_values = "raw counts or log-normalised values"
    if processor is not None and (processor.feature_extractor.normalize_total or processor.feature_extractor.log1p):
        input_values = "raw counts, normalised and log-transformed by the processor"
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        repo_id=repo_id,
        model_name=card_data.model_name,  # the template's title; the card data alone does not reach it
        cell_summary=f"{cell.num_hidden_layers} layers, width {cell.hidden_size}",
        lm_summary=f"{text.model_type} language model ({text.num_hidden_layers} layers, width {text.hidden_size})",
        num_cell_tokens=config.num_cell_tokens,
        vocab_size=cell.vocab_size,
        input_values=input_values,
        training=training,
        evaluation=evaluation,
    )


def register_remote_code(model, processor=None) -> None:
    """Adds `auto_map` entries so that users without the package can load with `trust_remote_code=True`; the
    modelling files are copied next to the weights on save. Users with the package need nothing."""
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModelForCausalLM")
    if processor is not None:
        processor.register_for_auto_class()
        processor.feature_extractor.register_for_auto_class()


def push_to_hub(
    model,
    processor,
    repo_id: str,
    eval_results: dict | str | None = None,
    max_shard_size: str | int = "5GB",
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload scMMGPT model",
    remote_code: bool = True,
    **card_kwargs,
):
    """Saves model (safetensors, sharded above `max_shard_size`), processor and model card to a temporary folder
    and uploads it in one commit. Returns the `CommitInfo`."""
    repo_url = create_repo(repo_id, private=private, token=token, exist_ok=True)
    if remote_code:
        register_remote_code(model, processor)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        processor.save_pretrained(folder)
        refused = [f for f in os.listdir(folder) if f.endswith(WEIGHT_SUFFIXES_REFUSED)]
        if refused:
            raise RuntimeError(f"Refusing to publish pickled weights: {refused}")
        card = render_model_card(model, processor, repo_url.repo_id, eval_results=eval_results, **card_kwargs)
        card.save(os.path.join(folder, "README.md"))
        return upload_folder(repo_id=repo_url.repo_id, folder_path=folder, commit_message=commit_message, token=token)


__all__ = ["eval_results_from_json", "push_to_hub", "register_remote_code", "render_model_card"]
