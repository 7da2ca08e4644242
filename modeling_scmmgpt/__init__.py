"""scMMGPT: joint single-cell + text language modelling, as a transformers model family.

Importing this package registers the `scmmgpt` and `scmmgpt_cell` model types with `AutoConfig`, `AutoModel`,
`AutoModelForCausalLM`, `AutoModelForPreTraining`, `AutoProcessor` and `AutoFeatureExtractor`, and the `pipeline()` tasks `cell-feature-extraction`,
`cell-type-annotation`, `cell-description` and `text-to-cell`.
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForPreTraining,
    AutoProcessor,
)

from . import configuration_scmmgpt, modeling_cell_encoder, modeling_scmmgpt
from .configuration_scmmgpt import ScMMGPTCellConfig, ScMMGPTConfig
from .gene_vocab import GeneVocab
from .loss_scmmgpt import ScMMGPTContrastiveLoss, ScMMGPTReconstructionLoss
from .modeling_cell_encoder import ScMMGPTCellModel, ScMMGPTCellPreTrainedModel
from .modeling_scmmgpt import (
    ScMMGPTCausalLMOutputWithPast,
    ScMMGPTCellGenerationOutput,
    ScMMGPTCellTowerOutput,
    ScMMGPTForConditionalGeneration,
    ScMMGPTForPreTraining,
    ScMMGPTModel,
    ScMMGPTModelOutputWithPast,
    ScMMGPTPreTrainedModel,
    ScMMGPTPreTrainingOutput,
)
from .pipelines import register_pipelines
from .processing_scmmgpt import GeneCoverage, ScMMGPTCellProcessor, ScMMGPTProcessor


AutoConfig.register(ScMMGPTCellConfig.model_type, ScMMGPTCellConfig, exist_ok=True)
AutoConfig.register(ScMMGPTConfig.model_type, ScMMGPTConfig, exist_ok=True)
AutoModel.register(ScMMGPTCellConfig, ScMMGPTCellModel, exist_ok=True)
AutoModel.register(ScMMGPTConfig, ScMMGPTModel, exist_ok=True)
AutoModelForCausalLM.register(ScMMGPTConfig, ScMMGPTForConditionalGeneration, exist_ok=True)
AutoModelForPreTraining.register(ScMMGPTConfig, ScMMGPTForPreTraining, exist_ok=True)
AutoProcessor.register(ScMMGPTConfig, ScMMGPTProcessor, exist_ok=True)
AutoFeatureExtractor.register(ScMMGPTConfig, ScMMGPTCellProcessor, exist_ok=True)
AutoFeatureExtractor.register(ScMMGPTCellConfig, ScMMGPTCellProcessor, exist_ok=True)
register_pipelines()

__version__ = "0.1.0"

# The model family's classes (each modelling module's `__all__`), plus the vocabulary, the processors and the losses.
__all__ = sorted(
    [
        *configuration_scmmgpt.__all__,
        *modeling_cell_encoder.__all__,
        *modeling_scmmgpt.__all__,
        *("GeneCoverage", "GeneVocab", "ScMMGPTCellProcessor", "ScMMGPTProcessor"),
        *("ScMMGPTContrastiveLoss", "ScMMGPTReconstructionLoss"),
    ]
)
