"""The scGPT-architecture cell encoder.

Same maths as scGPT's `TransformerModel._encode` (post-norm, ReLU, no positional encoding, no final norm), with the
attention written as explicit `q_proj`/`k_proj`/`v_proj`/`o_proj` linears: `nn.MultiheadAttention` calls its
`out_proj` functionally, so a PEFT LoRA adapter on it silently never trains.

Padded batches can run packed (`config.pack_padded_cells`; by default on GPUs, and where the fast mode measured it
faster): only real gene tokens go through the layers (cells have very different numbers of expressed genes, so
padding to the longest cell can cost more than the cells themselves), with attention kept within each cell by
flash-attention's variable-length kernel on GPUs and by one attention call per cell elsewhere.
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_scmmgpt import ScMMGPTCellConfig
from .fast_mode import FastModeMixin
from .packing import PackedCells, eager_attention, packed_attention, varlen_attn
from .utils import StrictLoadingMixin


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """[`eager_attention`] on transformers' attention-interface contract: `query`/`key`/`value` are
    `(batch, heads, seq, head_dim)`, the output `(batch, seq, heads, head_dim)`; dropout only in training."""
    output, weights = eager_attention(query, key, value, attention_mask, scaling, dropout if module.training else 0.0)
    return output.transpose(1, 2).contiguous(), weights


class ScMMGPTGeneEncoder(nn.Module):
    """LayerNorm(Embedding(gene)), scGPT's `GeneEncoder`."""

    def __init__(self, config: ScMMGPTCellConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.enc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, gene_ids: torch.LongTensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(gene_ids))


class ScMMGPTContinuousValueEncoder(nn.Module):
    """LayerNorm(Linear(ReLU(Linear(clamp(value, max))))), scGPT's `ContinuousValueEncoder`."""

    def __init__(self, config: ScMMGPTCellConfig):
        super().__init__()
        self.linear1 = nn.Linear(1, config.hidden_size)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.max_value = config.max_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        values = torch.clamp(values.unsqueeze(-1).to(self.linear1.weight.dtype), max=self.max_value)
        return self.dropout(self.norm(self.linear2(self.activation(self.linear1(values)))))


class ScMMGPTBinnedValueEncoder(nn.Module):
    """LayerNorm(Embedding(bin)), scGPT's `CategoryValueEncoder`. The table has `n_bins + 2` rows: bins index it
    directly (scGPT's category checkpoints put padding at `n_bins` and masking at `n_bins + 1`), and negative
    values (`pad_value=-2`, `mask_value=-1`) map to those same two rows."""

    def __init__(self, config: ScMMGPTCellConfig):
        super().__init__()
        self.n_bins = config.n_bins
        self.embedding = nn.Embedding(config.n_bins + 2, config.hidden_size)
        self.enc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        bins = values.round().long()
        bins = torch.where(bins < 0, self.n_bins + (bins == -1).long(), bins.clamp(max=self.n_bins + 1))
        return self.enc_norm(self.embedding(bins))


class ScMMGPTCellAttention(nn.Module):
    def __init__(self, config: ScMMGPTCellConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        # Initialised as nn.MultiheadAttention's (see ScMMGPTCellPreTrainedModel._init_weights).
        for projection in (self.q_proj, self.k_proj, self.v_proj):
            projection.fused_in_projection = True
        self.o_proj.zero_bias = True
        # The dtype attention computes in, when not the weights' (None), and its kernel ("sdpa" or "eager"): set by
        # `apply_fast_mode` from a measurement, since CPU attention kernels differ in which precision and sequence
        # lengths they are fast at (the fused kernel has no fast bf16 path on some CPUs; two bf16 matmuls do).
        self.attention_dtype: torch.dtype | None = None
        self.attention_kernel: str = "sdpa"

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, packed: PackedCells | None = None
    ) -> torch.Tensor:
        dropout = self.config.attention_dropout if self.training else 0.0
        if packed is not None:
            shape = (hidden_states.shape[0], -1, self.head_dim)
            query, key, value = (
                self._in_attention_dtype(proj(hidden_states).view(shape))
                for proj in (self.q_proj, self.k_proj, self.v_proj)
            )
            attn_output = packed_attention(query, key, value, packed, self.scaling, dropout, self.attention_kernel)
            return self.o_proj(attn_output.flatten(1).to(hidden_states.dtype))
        batch, seq_len, _ = hidden_states.shape
        shape = (batch, seq_len, -1, self.head_dim)
        query, key, value = (
            self._in_attention_dtype(proj(hidden_states).view(shape).transpose(1, 2))
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        attention_interface: Callable = eager_attention_forward
        if self.attention_kernel != "eager":
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.to(query.dtype)
        attn_output, _ = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=self.scaling,
            is_causal=False,
        )
        return self.o_proj(attn_output.reshape(batch, seq_len, -1).to(hidden_states.dtype))

    def _in_attention_dtype(self, states: torch.Tensor) -> torch.Tensor:
        return states if self.attention_dtype is None else states.to(self.attention_dtype)


class ScMMGPTCellLayer(GradientCheckpointingLayer):
    """Post-norm encoder layer, as torch's `TransformerEncoderLayer(norm_first=False)`.
    `activation_checkpointing_enable()` checkpoints it (transformers' `GradientCheckpointingLayer`)."""

    def __init__(self, config: ScMMGPTCellConfig):
        super().__init__()
        self.self_attn = ScMMGPTCellAttention(config)
        self.linear1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = ACT2FN[config.hidden_act]
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        packed: PackedCells | None = None,
        return_padded: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states` is `(batch, genes, hidden)`; the output has the same shape.

        With `packed`, the layer runs on real tokens only: its input is `(total_tokens, hidden)`, or a padded batch
        that it packs first (the first layer: output capturing then records the padded embeddings). It returns
        `(tokens, padded)`: `(total_tokens, hidden)` for the next layer, and with `return_padded` the same output
        as a `(batch, genes, hidden)` batch (else None), which is what `output_hidden_states` records."""
        if packed is not None and hidden_states.dim() == 3:
            hidden_states = packed.pack(hidden_states)
        attention = self.self_attn(hidden_states, attention_mask, packed)
        hidden_states = self.norm1(hidden_states + self.dropout(attention))
        feed_forward = self.linear2(self.dropout(self.activation(self.linear1(hidden_states))))
        hidden_states = self.norm2(hidden_states + self.dropout(feed_forward))
        if packed is None:
            return hidden_states
        return hidden_states, packed.unpack(hidden_states) if return_padded else None


class ScMMGPTCellPreTrainedModel(StrictLoadingMixin, FastModeMixin, PreTrainedModel):
    config: ScMMGPTCellConfig
    config_class = ScMMGPTCellConfig
    base_model_prefix = "cell_model"
    main_input_name = "cell_gene_ids"
    input_modalities = ("cell",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["ScMMGPTCellLayer"]
    # `output_hidden_states` through transformers' output capturing: the embeddings (the first layer's input), then
    # each layer's output; packed layers return their output padded as well, at index 1 (see ScMMGPTCellLayer).
    _can_record_outputs = {"hidden_states": OutputRecorder(ScMMGPTCellLayer, index=1)}

    def _init_weights(self, module):
        """scGPT's random initialisation: torch's defaults (`nn.MultiheadAttention`'s for attention) and gene
        embeddings uniform in +-0.1. With BERT-style std-0.02 linears instead, attention adds almost nothing to the
        residual stream of a new encoder, every cell comes out nearly the same (cosine 0.99999 between PBMC cells),
        and contrastive training from scratch stalls for hundreds of steps before cells separate."""
        if isinstance(module, nn.Linear) and getattr(module, "fused_in_projection", False):
            # Xavier-uniform over the fused (3 * hidden, hidden) in-projection, zero bias.
            bound = math.sqrt(6 / (4 * module.in_features))
            init.uniform_(module.weight, -bound, bound)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.in_features)
            if getattr(module, "zero_bias", False):
                init.zeros_(module.bias)
            else:
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            if module is self.get_input_embeddings():
                init.uniform_(module.weight, -0.1, 0.1)
            else:
                init.normal_(module.weight)


class ScMMGPTCellModel(ScMMGPTCellPreTrainedModel):
    """scGPT cell encoder. Its output at position 0 (`<cls>`) is the cell embedding."""

    def __init__(self, config: ScMMGPTCellConfig):
        super().__init__(config)
        # Whether to pack padded batches when `config.pack_padded_cells` is None: set by `apply_fast_mode` from a
        # measurement on this machine; never saved, since it belongs to the machine, not the weights.
        self.fast_mode_packing: bool | None = None
        self.gene_encoder = ScMMGPTGeneEncoder(config)
        if config.value_embedding == "continuous":
            self.value_encoder = ScMMGPTContinuousValueEncoder(config)
        else:
            self.value_encoder = ScMMGPTBinnedValueEncoder(config)
        self.layers = nn.ModuleList(ScMMGPTCellLayer(config) for _ in range(config.num_hidden_layers))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.gene_encoder.embedding

    def set_input_embeddings(self, value: nn.Embedding):
        self.gene_encoder.embedding = value

    @capture_outputs
    def forward(
        self,
        cell_gene_ids: torch.LongTensor,
        cell_values: torch.Tensor,
        cell_attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            cell_gene_ids (`torch.LongTensor` of shape `(batch_size, num_genes)`): gene token ids, `<cls>` first.
            cell_values (`torch.Tensor` of shape `(batch_size, num_genes)`): expression values (continuous or bins).
            cell_attention_mask (`torch.Tensor` of shape `(batch_size, num_genes)`, *optional*): 1 for genes, 0 for
                padding. Defaults to `cell_gene_ids != pad_token_id`, as scGPT does. The names are the cell
                processor's (`model(**processor(cells))`).
            output_hidden_states (`bool`, `int` or `list[int]`, *optional*, a keyword): also return every layer's
                output (the embeddings first), recorded by transformers' output capturing; an index or a list keeps
                only those (the others are None). When omitted, `config.output_hidden_states`. `return_dict=False`
                gives a tuple.

        Returns:
            `BaseModelOutputWithPooling`: `last_hidden_state` `(batch_size, num_genes, hidden_size)` (zero at
            padding when packed), `pooler_output` the `<cls>` output `(batch_size, hidden_size)`.
        """
        if cell_attention_mask is None:
            cell_attention_mask = cell_gene_ids.ne(self.config.pad_token_id)
        hidden_states = self.gene_encoder(cell_gene_ids) + self.value_encoder(cell_values)
        attention_mask = cell_attention_mask.bool()
        padded = not bool(attention_mask.all())  # no mask at all lets SDPA take its unmasked (faster) kernel
        if padded and self._can_pack(hidden_states):
            recording = kwargs.get("output_hidden_states", self.config.output_hidden_states)
            return self._forward_packed(hidden_states, attention_mask, return_padded=bool(recording))
        mask = None
        if padded:
            mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
            )
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask)
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=hidden_states[:, 0])

    def expression_weighted_mean(
        self,
        cell_gene_ids: torch.LongTensor,
        cell_values: torch.Tensor,
        cell_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""The cell's gene embeddings (before the encoder's LayerNorm) averaged with its values as weights (GenePT-w,
        scGPT's weighted pooling over the inputs); `<cls>`, padding and masked or negative values weigh nothing.

        Args:
            cell_gene_ids, cell_values, cell_attention_mask (`(num_cells, num_genes)`): the encoder's inputs.
        Returns:
            `torch.Tensor` of shape `(num_cells, hidden_size)`.
        """
        weights = self._summary_weights(cell_gene_ids, cell_values, cell_attention_mask)
        embeddings = self.get_input_embeddings()(cell_gene_ids)
        return torch.einsum("ng,ngh->nh", weights.to(embeddings.dtype), embeddings)

    def _summary_weights(self, gene_ids, values, attention_mask) -> torch.Tensor:
        """`(num_cells, num_genes)` weights summing to 1 over each cell's real genes (0 for a cell without any)."""
        real = gene_ids.ne(self.config.cls_token_id) & gene_ids.ne(self.config.pad_token_id)
        if attention_mask is not None:
            real &= attention_mask.bool()
        weights = values.float().clamp(min=0) * real
        return weights / weights.sum(1, keepdim=True).clamp(min=1e-12)

    @torch.no_grad()
    def init_gene_embeddings_from_pca(
        self,
        cell_gene_ids: torch.LongTensor,
        cell_values: torch.Tensor,
        cell_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""Sets the gene embeddings from the principal components of training cells, so that
        [`expression_weighted_mean`] of those cells is, in its first `k = min(hidden_size, num_cells - 1)`
        dimensions, their PCA scores scaled to unit variance, plus a constant (returned). The other dimensions, the
        special tokens and the genes these cells never express keep their values. Sets
        `config.gene_embedding_init = "pca"`.

        Args:
            cell_gene_ids, cell_values, cell_attention_mask (`(num_cells, num_genes)`): the cell processor's
                outputs for training cells.
        Returns:
            `torch.Tensor` of shape `(hidden_size,)`: the mean of the cells' weighted means, which a summary bias
            subtracts to centre them.
        """
        weights = self._summary_weights(cell_gene_ids, cell_values, cell_attention_mask).double()
        matrix = torch.zeros(cell_gene_ids.shape[0], self.config.vocab_size, dtype=torch.float64)
        matrix.scatter_add_(1, cell_gene_ids.cpu(), weights.cpu())
        k = min(self.config.hidden_size, matrix.shape[0] - 1)
        if k < 1:
            raise ValueError("init_gene_embeddings_from_pca needs at least two cells.")
        centred = matrix - matrix.mean(0)
        _, singular, components = torch.linalg.svd(centred, full_matrices=False)
        scale = singular[:k] / math.sqrt(matrix.shape[0] - 1)  # score standard deviations
        loadings = components[:k].T / scale.clamp(min=1e-12)  # (vocab, k)
        expressed = matrix.ne(0).any(0)
        embedding = self.get_input_embeddings().weight
        embedding[expressed, :k] = loadings[expressed].to(embedding)
        self.config.gene_embedding_init = "pca"
        return (matrix.to(embedding) @ embedding).mean(0)

    def _can_pack(self, hidden_states: torch.Tensor) -> bool:
        """`config.pack_padded_cells`, or with `None` (auto): the fast mode's measured choice, else on GPUs where
        the variable-length kernel applies."""
        if self.config.pack_padded_cells is not None:
            return self.config.pack_padded_cells
        if self.fast_mode_packing is not None:
            return self.fast_mode_packing
        if not hidden_states.is_cuda:
            return False
        half = (torch.float16, torch.bfloat16)
        autocast = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in half
        dropout = self.training and self.config.attention_dropout > 0
        return varlen_attn is not None and (autocast or self.dtype in half) and not dropout

    def _forward_packed(self, hidden_states, attention_mask, return_padded: bool) -> BaseModelOutputWithPooling:
        """The layers on real tokens only; outputs are zero at padding, as scGPT's fast path returns them."""
        packed, padded = PackedCells.from_mask(attention_mask), None
        for layer in self.layers:  # the first layer packs the padded embeddings
            hidden_states, padded = layer(hidden_states, None, packed, return_padded)
        if padded is None:  # not recorded (or no layers: the embeddings, zeroed at padding)
            padded = packed.unpack(packed.pack(hidden_states) if hidden_states.dim() == 3 else hidden_states)
        hidden_states = padded
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=hidden_states[:, 0])


__all__ = ["ScMMGPTCellPreTrainedModel", "ScMMGPTCellModel"]
