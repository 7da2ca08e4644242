"""scGPT `TransformerModel` state dicts to [`ScMMGPTCellModel`] weights.

Handles both attention layouts found in scGPT checkpoints: torch's `self_attn.in_proj_weight` and flash-attn's
`self_attn.Wqkv.*` (a pure rename of the same packed q/k/v). scGPT's task heads (`decoder`, `mvc_decoder`,
`cls_decoder`, ...) are not part of the encoder and are reported, not silently dropped.
"""

import re
from dataclasses import dataclass, field

import torch


_RENAMES = [
    (r"^encoder\.", "gene_encoder."),
    (r"^value_encoder\.", "value_encoder."),
    (r"^transformer_encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"layers.\1.self_attn.o_proj."),
    (r"^transformer_encoder\.layers\.(\d+)\.(linear1|linear2|norm1|norm2)\.", r"layers.\1.\2."),
]
_PACKED_QKV = re.compile(r"^transformer_encoder\.layers\.(\d+)\.self_attn\.(?:in_proj_|Wqkv\.)(weight|bias)$")


@dataclass
class ScGPTConversionReport:
    """What a conversion did with each key: `unused` scGPT keys (heads the encoder has no use for) and `missing`
    encoder keys the checkpoint did not provide."""

    unused: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def convert_scgpt_state_dict(
    scgpt_state_dict: dict[str, torch.Tensor], expected_keys: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], ScGPTConversionReport]:
    """Renames scGPT encoder keys to ours and splits packed q/k/v projections.

    Args:
        scgpt_state_dict: a scGPT `TransformerModel.state_dict()` (either attention layout).
        expected_keys: our encoder's `state_dict().keys()`, to report missing ones.

    Returns:
        The converted state dict and a [`ScGPTConversionReport`].
    """
    converted, report = {}, ScGPTConversionReport()
    for key, tensor in scgpt_state_dict.items():
        packed = _PACKED_QKV.match(key)
        if packed:
            layer, kind = packed.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                converted[f"layers.{layer}.self_attn.{name}.{kind}"] = part.clone()
            continue
        for pattern, replacement in _RENAMES:
            if re.match(pattern, key):
                converted[re.sub(pattern, replacement, key)] = tensor
                break
        else:
            report.unused.append(key)
    if expected_keys is not None:
        report.missing = sorted(set(expected_keys) - set(converted))
    return converted, report


def convert_scgpt_checkpoint(
    checkpoint: str,
    args_json: str | None = None,
    vocab_json: str | None = None,
    output_dir: str | None = None,
    strict: bool = True,
):
    """A scGPT checkpoint (`best_model.pt`, `args.json`, `vocab.json`) to a [`ScMMGPTCellModel`] and its
    [`ScMMGPTCellProcessor`], optionally saved (safetensors) to `output_dir` as a cell-encoder folder that
    `ScMMGPTForConditionalGeneration.from_pretrained_parts` reads.

    Args:
        checkpoint: `best_model.pt`, or the folder holding the three files.
        args_json, vocab_json: default to `args.json` / `vocab.json` next to the checkpoint.
        strict: raise when encoder weights are missing (unused scGPT heads are only reported).

    Returns:
        `(model, cell_processor, report)`.
    """
    import json
    import logging
    import os
    import pickle
    import warnings

    from .configuration_scmmgpt import ScMMGPTCellConfig
    from .gene_vocab import GeneVocab
    from .modeling_cell_encoder import ScMMGPTCellModel
    from .processing_scmmgpt import ScMMGPTCellProcessor

    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
    checkpoint = os.path.join(checkpoint, "best_model.pt") if os.path.isdir(checkpoint) else checkpoint
    args_json = args_json or os.path.join(folder, "args.json")
    vocab_json = vocab_json or os.path.join(folder, "vocab.json")
    for path in (checkpoint, args_json, vocab_json):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: a scGPT checkpoint folder holds best_model.pt, args.json, vocab.json."
            )
    with open(args_json, encoding="utf-8") as f:
        args = json.load(f)
    vocab = GeneVocab.from_scgpt_json(vocab_json, special_tokens=(args.get("pad_token", "<pad>"), "<cls>", "<eoc>"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on pickle protocols; the refusal below is what matters
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{checkpoint}: refused: its pickle holds more than tensors (torch.load with "
                f"weights_only=True: {str(error).splitlines()[-1][:160]}). Convert only checkpoints from a "
                "source you trust, re-saved as plain state dicts."
            ) from error
    state = state.get("model_state_dict", state) if isinstance(state, dict) else state

    binned = args.get("input_emb_style", "continuous") == "category"
    n_bins = args.get("n_bins", 51)
    if binned:  # the table's row count is the truth: scGPT sizes it n_input_bins = n_bins + 2
        n_bins = state["value_encoder.embedding.weight"].shape[0] - 2
    # The vocabulary decides the special ids and the fingerprint; the size is the checkpoint's own gene table.
    fields = {**vocab.cell_config_fields(), "vocab_size": state["encoder.embedding.weight"].shape[0]}
    config = ScMMGPTCellConfig(
        **fields,
        hidden_size=args.get("embsize", args.get("d_model")),
        num_attention_heads=args.get("nheads", args.get("nhead")),
        intermediate_size=args["d_hid"],
        num_hidden_layers=args.get("nlayers"),
        dropout=args.get("dropout", 0.2),
        value_embedding="binned" if binned else "continuous",
        n_bins=n_bins,
        pad_value=args.get("pad_value", -2),
        mask_value=args.get("mask_value", -1),
        max_genes=args.get("max_seq_len", 1200),
    )
    if args.get("pre_norm") or args.get("use_batch_labels") or args.get("DSBN") or args.get("domain_spec_batchnorm"):
        raise ValueError(f"{args_json}: pre-norm or batch-label scGPT variants are not supported by this encoder.")
    model = ScMMGPTCellModel(config)
    converted, report = convert_scgpt_state_dict(state, list(model.state_dict()))
    if report.missing and strict:
        raise ValueError(f"{checkpoint}: encoder weights missing from the checkpoint: {report.missing}")
    unexpected = [k for k in converted if k not in model.state_dict()]
    if unexpected:
        raise ValueError(f"{checkpoint}: converted keys the encoder does not have: {unexpected}")
    model.load_state_dict(converted, strict=strict)
    if report.unused:
        logging.getLogger(__name__).info("Unused scGPT keys (task heads): %s", report.unused)
    processor = ScMMGPTCellProcessor(
        vocab,
        max_genes=config.max_genes,
        n_bins=args.get("n_bins", 51),
        pad_value=config.pad_value,
        cls_value=config.pad_value,
    )
    if output_dir is not None:
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    return model, processor, report


__all__ = ["ScGPTConversionReport", "convert_scgpt_checkpoint", "convert_scgpt_state_dict"]
