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


__all__ = ["ScGPTConversionReport", "convert_scgpt_state_dict"]
