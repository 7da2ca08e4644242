"""scMMGPT configuration: a scGPT-style cell encoder, a BLIP-2 Q-Former and any causal LM."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, Blip2QFormerConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class _RefuseOtherModelTypes:
    """`from_pretrained` refuses a `config.json` whose `model_type` is not one this config reads: read with default
    sub-configs, a Llama config would allocate a 7B-sized text tower until the OOM killer ended it."""

    _readable_model_types: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, _ = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        found = config_dict.get("model_type")
        if found not in cls._readable_model_types:
            raise ValueError(
                f"{pretrained_model_name_or_path}: config.json has model_type {found!r}, not {cls.model_type!r}; this "
                "folder holds another model. Pass a folder saved by scMMGPT (scmmgpt init, train, demo or convert-scgpt)."
            )
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except StrictDataclassError as error:  # not a ValueError: one line that names the file and the field
            detail = " ".join(str(error).split())
            raise ValueError(f"{pretrained_model_name_or_path}: config.json: {detail}") from error


@strict
class ScMMGPTCellConfig(_RefuseOtherModelTypes, PreTrainedConfig):
    r"""
    Configuration of the scGPT-architecture cell encoder ([`ScMMGPTCellModel`]). Defaults are scGPT's whole-human
    checkpoint. scGPT's own argument names (`d_model`, `nhead`, `nlayers`, `d_hid`) are accepted as aliases.

    Args:
        vocab_size (`int`, *optional*, defaults to 60697):
            Number of gene tokens, special tokens included (the 60,694-gene census vocabulary plus `<pad>`, `<cls>`,
            `<eoc>`).
        hidden_size (`int`, *optional*, defaults to 512):
            Width of the encoder (scGPT `d_model` / `embsize`).
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of transformer layers (scGPT `nlayers`).
        num_attention_heads (`int`, *optional*, defaults to 8):
            Number of attention heads (scGPT `nhead`).
        intermediate_size (`int`, *optional*, defaults to 512):
            Width of the feed-forward block (scGPT `d_hid`).
        hidden_act (`str`, *optional*, defaults to `"relu"`):
            Feed-forward activation; scGPT uses ReLU.
        dropout (`float`, *optional*, defaults to 0.2):
            Dropout in the value encoder, the attention output and the feed-forward block.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the attention weights (torch's `TransformerEncoderLayer` applies `dropout` there too; scGPT
            checkpoints are used in eval mode, where both are off).
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of every LayerNorm.
        pack_padded_cells (`bool`, *optional*):
            Run padded batches packed: only real gene tokens go through the layers, attention within each cell. `None`
            (auto) packs on GPUs, where flash-attention's variable-length kernel does a batch in one call (half
            precision, no attention dropout), and where `enable_fast_mode()` measured packing faster on this
            machine. `True` also packs elsewhere with one attention call per cell (whole-human encoder on 2 CPU
            cores: about 1.25x the cells/s of padding on PBMC's 173-287 expressed genes; the tiny demo encoder:
            about even). `False` never packs.
        value_embedding (`str`, *optional*, defaults to `"continuous"`):
            `"continuous"`: a value goes through Linear-ReLU-Linear-LayerNorm (scGPT's `ContinuousValueEncoder`, used
            by the released checkpoints, also on binned values). `"binned"`: a value is an integer bin looked up in an
            embedding table (scGPT's `CategoryValueEncoder`).
        n_bins (`int`, *optional*, defaults to 51):
            Number of expression bins. With `value_embedding="binned"` the table has `n_bins + 2` rows so that the
            `<cls>` and padding values fit after the bins.
        max_value (`float`, *optional*, defaults to 512.0):
            Continuous values are clamped to at most this before encoding, as in scGPT.
        pad_token_id (`int`, *optional*, defaults to 60694):
            Gene id of `<pad>`. Positions holding it are masked out.
        cls_token_id (`int`, *optional*, defaults to 60695):
            Gene id of `<cls>`, prepended to every cell; its output is the cell embedding.
        mask_token_id (`int`, *optional*):
            Gene id of a mask token, if the vocabulary has one (scGPT masks values, not genes, so it usually has not).
        pad_value (`float`, *optional*, defaults to -2.0):
            Expression value at padded positions.
        mask_value (`float`, *optional*, defaults to -1.0):
            Expression value of masked genes in masked-expression modelling.
        max_genes (`int`, *optional*, defaults to 1200):
            Maximum tokens per cell, `<cls>` included (scGPT `max_seq_len`).
        gene_embedding_init (`str`, *optional*, defaults to `"random"`):
            How the gene embeddings started, kept with the weights: `"random"` (scGPT's uniform +-0.1) or `"pca"`
            (set by [`ScMMGPTCellModel.init_gene_embeddings_from_pca`] from a training matrix, so that the
            expression-weighted mean of a cell's gene embeddings is its standardised PCA score vector).
        gene_vocab_fingerprint (`str`, *optional*):
            [`GeneVocab.fingerprint`] of the gene vocabulary the gene embeddings belong to. Set when a model is built
            or converted with its vocabulary; a processor with another vocabulary is then refused
            ([`ScMMGPTProcessor.check_model_config`]), where it would silently read genes through the wrong rows.

    Example:

    ```python
    >>> from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellModel
    >>> config = ScMMGPTCellConfig(vocab_size=100, d_model=32, nhead=4, nlayers=2, d_hid=32, pad_token_id=97, cls_token_id=98)
    >>> model = ScMMGPTCellModel(config)
    ```"""

    model_type = "scmmgpt_cell"
    _readable_model_types = ("scmmgpt_cell",)
    base_config_key = "cell_config"
    attribute_map = {
        "d_model": "hidden_size",
        "embsize": "hidden_size",
        "nhead": "num_attention_heads",
        "nlayers": "num_hidden_layers",
        "d_hid": "intermediate_size",
    }

    vocab_size: int = 60697
    hidden_size: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    intermediate_size: int = 512
    hidden_act: str = "relu"
    dropout: float | int = 0.2
    attention_dropout: float | int = 0.0
    layer_norm_eps: float = 1e-5
    pack_padded_cells: bool | None = None
    value_embedding: Literal["continuous", "binned"] = "continuous"
    n_bins: int = 51
    max_value: float | int = 512.0
    pad_token_id: int | None = 60694
    cls_token_id: int | None = 60695
    mask_token_id: int | None = None
    pad_value: float | int = -2.0
    mask_value: float | int = -1.0
    max_genes: int = 1200
    gene_embedding_init: Literal["random", "pca"] = "random"
    gene_vocab_fingerprint: str | None = None
    initializer_range: float = 0.02

    def validate_architecture(self):
        """Part of `@strict` validation: catch sizes the encoder cannot be built with."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        for name in ("pad_token_id", "cls_token_id"):
            token_id = getattr(self, name)
            if token_id is None or not 0 <= token_id < self.vocab_size:
                raise ValueError(f"{name}={token_id} must be a gene id in [0, vocab_size={self.vocab_size}).")


# The pre-training losses' settings: fields of ScMMGPTConfig, and the stage arguments that override them by name.
PRETRAINING_LOSS_SETTINGS = (
    "itc_loss_weight",
    "itm_loss_weight",
    "max_logit_scale",
    "masked_value_loss_weight",
    "expression_loss_weight",
    "mask_ratio",
    "unexpressed_genes",
)


def check_loss_settings(settings: dict) -> None:
    """Raises on out-of-range pre-training loss settings among `settings` (names of `PRETRAINING_LOSS_SETTINGS`;
    a stage's pair of weights is checked when both are present)."""
    for name in ("itc_loss_weight", "itm_loss_weight", "masked_value_loss_weight", "expression_loss_weight"):
        if settings.get(name) is not None and settings[name] < 0:
            raise ValueError(f"{name}={settings[name]}: a loss weight must be >= 0.")
    for pair in (("itc_loss_weight", "itm_loss_weight"), ("masked_value_loss_weight", "expression_loss_weight")):
        if all(settings.get(name) is not None for name in pair) and settings[pair[0]] + settings[pair[1]] == 0:
            raise ValueError(f"{pair[0]} and {pair[1]} are both 0: the stage would have no loss; make one positive.")
    if settings.get("mask_ratio") is not None and not 0 < settings["mask_ratio"] < 1:
        raise ValueError(f"mask_ratio must be in (0, 1), got {settings['mask_ratio']}.")
    if settings.get("max_logit_scale") is not None and settings["max_logit_scale"] <= 0:
        raise ValueError(f"max_logit_scale must be positive, got {settings['max_logit_scale']}.")
    if settings.get("unexpressed_genes") is not None and settings["unexpressed_genes"] < 0:
        raise ValueError(f"unexpressed_genes must be >= 0, got {settings['unexpressed_genes']}.")


@strict
class ScMMGPTConfig(_RefuseOtherModelTypes, PreTrainedConfig):
    r"""
    Configuration of scMMGPT ([`ScMMGPTModel`], [`ScMMGPTForConditionalGeneration`]): a cell encoder read by a
    Q-Former whose `num_cell_tokens` query outputs are projected into a causal LM between `<cell>` and `</cell>`.

    Args:
        cell_config (`dict` or [`ScMMGPTCellConfig`], *optional*):
            The cell encoder. Defaults to scGPT's whole-human sizes.
        qformer_config (`dict` or `Blip2QFormerConfig`, *optional*):
            The Q-Former. Its `encoder_hidden_size` is set to the cell encoder's width, and its text path
            (`use_qformer_text_input`) is always built.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Any causal LM config (Llama, Qwen2, GPT-2, ...); defaults to Llama.
        num_cell_tokens (`int`, *optional*, defaults to 32):
            Number of Q-Former queries, i.e. of `<cell_i>` tokens in a cell span.
        projection_dim (`int`, *optional*, defaults to 256):
            Width of the shared cell-text space used by contrastive alignment.
        cell_summary (`bool`, *optional*, defaults to `False`):
            Add a summary of the cell's expression to every Q-Former query output: the expression-weighted mean of
            its gene embeddings (GenePT-w; scGPT's weighted pooling over the inputs), plus a learned bias, through an
            orthogonally initialised linear map. A randomly initialised encoder and Q-Former give almost identical
            outputs for every cell (cosine 0.99999 between PBMCs), which stalls contrastive training; the summary is
            cell-specific from step 0 (with `gene_embedding_init="pca"` it is the cell's PCA scores). Off for
            converted scGPT checkpoints, whose outputs stay exactly scGPT's.
        contrastive_batch_norm (`bool`, *optional*, defaults to `False`):
            Centre and scale the pooled cell and text features with a BatchNorm before their contrastive projections,
            as CellWhisperer's CLIP-Lite heads do. A new Q-Former gives every cell a large common component that
            L2-normalised features keep; centring removes it. In eval mode the running statistics are used, so a
            cell's features do not depend on its batch.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the cell-to-LM and LM-to-cell MLPs.
        cell_start_token_index (`int`, *optional*):
            LM token id of `<cell>`. Set by [`ScMMGPTProcessor`] / `from_pretrained_parts` once the tokens are added.
        cell_token_index (`int`, *optional*):
            LM token id of `<cell_0>`; `<cell_i>` is `cell_token_index + i`.
        cell_end_token_index (`int`, *optional*):
            LM token id of `</cell>`.
        lm_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the next-token loss in the total loss.
        cell_regression_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the MSE between the LM's `<cell_i>` hidden states (through the LM-to-cell head) and the target
            cell's Q-Former outputs.
        expression_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the MSE between decoded and target expression: of a generated cell (instruction stage), and of a
            real cell decoded from its own query outputs (reconstruction stage).
        itc_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the cell-text contrastive loss of the alignment stage ([`ScMMGPTContrastiveLoss`]).
        itm_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the cell-text matching loss on hard negatives of the alignment stage (0 skips it).
        max_logit_scale (`float`, *optional*, defaults to 100.0):
            Clamp on `exp(logit_scale)`, the contrastive inverse temperature (CLIP's 100).
        masked_value_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the masked-value MSE of the reconstruction stage ([`ScMMGPTReconstructionLoss`]).
        mask_ratio (`float`, *optional*, defaults to 0.15):
            Fraction of each cell's genes whose value the reconstruction stage masks (scGPT's GEP).
        unexpressed_genes (`int`, *optional*, defaults to 0):
            Per cell, this many random vocabulary genes the cell does not express are added to the reconstruction
            stage's expression targets with value 0. Cells list expressed genes only, so without them the decoder
            never sees a zero and a generated cell expresses every gene it is asked for.
        expression_variance (`bool`, *optional*, defaults to `False`):
            The expression decoder also predicts a log-variance per gene, trained by a Gaussian likelihood around the
            (detached) predicted mean, so generated cells can be *sampled* (`generate_cells(sample=True)`) instead of
            all being the conditional mean of their prompt.
        expression_temperature (`float`, *optional*, defaults to 1.0):
            Default scale of a sampled cell's deviation from its decoded mean (`generate_cells(sample=True)`): the
            decoder's per-gene standard deviation times this. The variance head learns real cells' residuals around
            their own decoded mean, the decoder's error included; below 1 keeps sampled cells nearer their type's
            profile, 0 gives the mean (clipped at zero).
        gene_expression_variance (`bool`, *optional*, defaults to `False`):
            With `expression_variance`: the log-variance is one value per vocabulary gene, the same for every cell (a
            buffer of `cell_config.vocab_size`, not trained), instead of the head's per-cell prediction. Stage 2's
            `decoder_init="least_squares"` fits it: each gene's variance of the fitted readout's residuals over the
            fitting cells, zeros included. The head learns the spread of the genes a training cell lists (its
            expressed genes and a few unexpressed ones), which is not a whole cell's: sampled at its full spread,
            generated cells land far from real ones (`docs/recipe.md` has the measurements).
        bilinear_expression_readout (`bool`, *optional*, defaults to `False`):
            Add to each gene's decoded value the dot product of its gene embedding with a linear map of the mean cell
            token: a low-rank readout, like a PCA reconstruction, that starts at zero. The attention readout alone
            learns gene-wise averages first; in the demo's steps, expression decoded from real cells' own tokens let
            a 5-NN classifier recover the type of only about a third of test cells.
        gene_expression_readout (`bool`, *optional*, defaults to `False`):
            Add to each gene's decoded value a linear readout of the mean cell token with that gene's own weights
            and bias (a table of `cell_config.vocab_size` x `qformer_config.hidden_size + 1`), zero at the start.
            The gene embeddings are shared with the encoder and shaped by it: on the demo their span held 6% of the
            expression's variance, so the bilinear readout could not reconstruct cells; a per-gene readout of the
            mean token is a full linear map (ridge on the demo's test split: class means correlate 0.89 with the real
            ones). Stage 2 can fit it in closed form (`decoder_init="least_squares"`).
        cell_codebook_labels (`list[str]`, *optional*):
            Labels of a cell codebook, one entry each: a classifier over the flattened query outputs mixes the entries
            (each `num_cell_tokens` LM embeddings), and the mixture is added to the projector's cell tokens. The
            instruction stage sets it (`bridge_init="label_codebook"`, through [`ScMMGPTModel.set_cell_codebook`]),
            starting each entry from the LM's embeddings of its label's tokens and the classifier from a logistic
            regression on training cells, so a cell reads like the name of the type it most resembles, as a
            confident mixture rather than a least-squares blur of all names. `None` (default): no codebook.
        open_set_labels (`list[str]`, *optional*):
            The cell types (labels and Cell Ontology ids) of the cells the model was trained on, set with an open-set
            reference ([`ScMMGPTModel.set_open_set_reference`]; the stage trainers do it after training). Zero-shot
            annotation then knows which candidates are new to the model: a cell that resembles no training cell
            (see `open_set_threshold`) is named among the new candidates only. Contrastive heads learn their training
            texts, so without this a cell of a type never trained on goes to the nearest trained type (the demo's
            held-out B and NK cells: 0 of 19 named right). `None` (default): no reference.
        open_set_reference_size (`int`, *optional*, defaults to 0):
            Number of reference cells kept (their contrastive cell features, a buffer saved with the weights).
        open_set_neighbours (`int`, *optional*, defaults to 5):
            A cell's similarity to the training cells is its mean cosine similarity to its `open_set_neighbours`
            nearest reference cells (deep nearest-neighbour out-of-distribution detection, Sun et al. 2022).
        open_set_threshold (`float`, *optional*):
            Cells below this similarity are new to the model: by default the 5% quantile of held-out validation
            cells of the training types, so about 1 in 20 cells of a known type is taken for a new one.
        open_set_hubness_correction (`bool`, *optional*, defaults to `True`):
            Name a new cell among the new candidates by cross-domain similarity local scaling (CSLS; Conneau et al.
            2018, "Word Translation Without Parallel Data"): its cosine similarity to a candidate's text minus half
            the text's own similarity to the training cells (`open_set_neighbours` nearest reference cells). A new
            type's text that lies near the training cells (a "hub") otherwise draws the cells of every new type;
            on the demo's held-out B and NK cells, CSLS took zero-shot naming from 0.228 to about 0.4 (seeds 0-2).
        freeze_cell_encoder (`bool`, *optional*, defaults to `False`):
            Keep the cell encoder's weights fixed.
        freeze_qformer (`bool`, *optional*, defaults to `False`):
            Keep the Q-Former, its queries and its text path fixed.
        freeze_language_model (`bool`, *optional*, defaults to `False`):
            Keep the LM and `lm_head` fixed (LoRA adapters added later still train).

    Example:

    ```python
    >>> from modeling_scmmgpt import ScMMGPTConfig, ScMMGPTForConditionalGeneration
    >>> config = ScMMGPTConfig(
    ...     cell_config={"vocab_size": 100, "d_model": 32, "nhead": 4, "nlayers": 2, "d_hid": 32, "pad_token_id": 97, "cls_token_id": 98},
    ...     qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64},
    ...     text_config={"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 128},
    ...     num_cell_tokens=4,
    ... )
    >>> model = ScMMGPTForConditionalGeneration(config)
    ```"""

    model_type = "scmmgpt"
    _readable_model_types = ("scmmgpt",)
    sub_configs_defaults = {
        "cell_config": ScMMGPTCellConfig,
        "qformer_config": Blip2QFormerConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    cell_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_cell_tokens: int = 32
    projection_dim: int = 256
    cell_summary: bool = False
    contrastive_batch_norm: bool = False
    projector_hidden_act: str = "gelu"
    cell_start_token_index: int | None = None
    cell_token_index: int | None = None
    cell_end_token_index: int | None = None
    lm_loss_weight: float | int = 1.0
    cell_regression_loss_weight: float | int = 1.0
    expression_loss_weight: float | int = 1.0
    itc_loss_weight: float | int = 1.0
    itm_loss_weight: float | int = 1.0
    max_logit_scale: float | int = 100.0
    masked_value_loss_weight: float | int = 1.0
    mask_ratio: float = 0.15
    unexpressed_genes: int = 0
    expression_variance: bool = False
    expression_temperature: float | int = 1.0
    gene_expression_variance: bool = False
    bilinear_expression_readout: bool = False
    gene_expression_readout: bool = False
    cell_codebook_labels: list[str] | None = None
    open_set_labels: list[str] | None = None
    open_set_reference_size: int = 0
    open_set_neighbours: int = 5
    open_set_threshold: float | int | None = None
    open_set_hubness_correction: bool = True
    freeze_cell_encoder: bool = False
    freeze_qformer: bool = False
    freeze_language_model: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The Q-Former cross-attends to the cell encoder's per-gene outputs.
        self.qformer_config.encoder_hidden_size = self.cell_config.hidden_size
        # Contrastive alignment runs text through the Q-Former, which needs its text feed-forward blocks.
        self.qformer_config.use_qformer_text_input = True
        # LMs such as SmolLM2 and GPT-2 tie lm_head to the input embeddings; keep their behaviour.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    def validate_loss_settings(self):
        """Part of `@strict` validation: the pre-training losses' weights and settings."""
        check_loss_settings({name: getattr(self, name) for name in PRETRAINING_LOSS_SETTINGS})

    def validate_expression_variance(self):
        """Part of `@strict` validation: a per-gene variance is a kind of predicted variance."""
        if self.gene_expression_variance and not self.expression_variance:
            raise ValueError("gene_expression_variance=True needs expression_variance=True: set both, or neither.")

    def validate_open_set(self):
        """Part of `@strict` validation: the open-set reference's sizes."""
        if self.open_set_neighbours < 1 or self.open_set_reference_size < 0:
            raise ValueError(
                f"open_set_neighbours={self.open_set_neighbours} and open_set_reference_size="
                f"{self.open_set_reference_size}: need at least 1 neighbour and a size of 0 or more."
            )

    @property
    def cell_token_ids(self) -> list[int]:
        """LM token ids of `<cell_0>` ... `<cell_{num_cell_tokens-1}>`."""
        if self.cell_token_index is None:
            raise ValueError(
                "The config has no cell token ids. Add the cell tokens with ScMMGPTProcessor / "
                "ScMMGPTForConditionalGeneration.from_pretrained_parts, or set cell_token_index."
            )
        return list(range(self.cell_token_index, self.cell_token_index + self.num_cell_tokens))


__all__ = ["ScMMGPTCellConfig", "ScMMGPTConfig"]
