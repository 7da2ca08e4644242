"""Packed cells: a padded `(batch, genes)` batch run as its real gene tokens only, `(total_tokens, ...)`, with
attention kept within each cell. Cells have very different numbers of expressed genes, so padding to the longest
can cost more than the cells themselves. Used by the cell encoder and timed by the fast mode."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


try:  # torch >= 2.9, CUDA only
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


@dataclass
class PackedCells:
    """Where each cell's tokens lie in a packed `(total_tokens, ...)` tensor: cell `i` spans
    `cu_seqlens[i]:cu_seqlens[i + 1]`; `index` holds their flat positions in the padded `(batch, genes)` batch."""

    cu_seqlens: torch.Tensor
    max_length: int
    index: torch.Tensor
    padded_shape: tuple[int, int]

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> "PackedCells":
        """From a boolean `(batch, genes)` mask of real tokens."""
        lengths = attention_mask.sum(1)
        index = attention_mask.flatten().nonzero().squeeze(1)
        return cls(F.pad(lengths.cumsum(0), (1, 0)), int(lengths.max()), index, tuple(attention_mask.shape))

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """`(batch, genes, hidden)` -> `(total_tokens, hidden)`."""
        return padded.flatten(0, 1)[self.index]

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(total_tokens, hidden)` -> `(batch, genes, hidden)`, zero at padding."""
        batch, length = self.padded_shape
        padded = tokens.new_zeros(batch * length, tokens.shape[-1]).index_copy(0, self.index, tokens)
        return padded.view(batch, length, -1)


def eager_attention(query, key, value, attention_mask, scaling: float, dropout: float = 0.0):
    """Reference attention on `(batch, heads, seq, head_dim)` tensors: two matmuls around a float32 softmax. The mask
    is additive (float) or boolean (True attends: transformers' SDPA masks). Returns the output, same shape as
    `query`, and the attention weights. On some CPUs this is the fast bf16 kernel (see `fast_mode`)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    weights = F.dropout(F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), p=dropout)
    return torch.matmul(weights, value), weights


def packed_attention(
    query, key, value, packed: PackedCells, scaling: float, dropout: float = 0.0, kernel: str = "sdpa"
) -> torch.Tensor:
    """Attention within each cell of packed `(total_tokens, heads, head_dim)` tensors; same shape out. `kernel`:
    `"sdpa"` (torch's fused kernel) or `"eager"` (two matmuls around a float32 softmax), for CPUs where the fused
    kernel has no fast bf16 path (see `fast_mode`); CUDA half precision takes flash-attention's varlen kernel."""
    if varlen_attn is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and not dropout:
        cu = packed.cu_seqlens.to(torch.int32)
        return varlen_attn(query, key, value, cu, cu, packed.max_length, packed.max_length, scale=scaling)
    bounds = packed.cu_seqlens.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        # 4-D `(1, heads, genes, head_dim)`: CPU SDPA takes its flash kernel only for 4-D inputs (3-D ones fall to
        # the math path, 2.7x slower at 230 genes).
        q, k, v = (t[start:end].transpose(0, 1)[None] for t in (query, key, value))
        if kernel == "eager":
            attended = eager_attention(q, k, v, None, scaling, dropout)[0]
        else:
            attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
        outputs.append(attended[0].transpose(0, 1))
    return torch.cat(outputs)


__all__ = ["PackedCells", "eager_attention", "packed_attention"]
