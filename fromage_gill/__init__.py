"""fromage_gill: ground a frozen language model to images (FROMAGe, GILL, MAGIC).

import fromage_gill as fg
pipe = fg.load_pipeline("tiny-gill")        # offline, seeded random weights
pipe = fg.load_pipeline("gill", quantization="8bit")   # the published model on a GPU
fg.embed_texts(pipe, ["a dog on a beach"]).embeddings   # the research API: docs/research.md
"""

from .config import ConfigError, ModelConfig, list_presets, load_config
from .pipeline import Pipeline, load_pipeline
from .probe import (
    CandidateScores,
    Decisions,
    GenerationEmbeddings,
    ImageEmbeddings,
    TextEmbeddings,
    decision_probabilities,
    embed_images,
    embed_prompts,
    embed_texts,
    generation_embeddings,
    score_candidates,
)

__all__ = [
    "CandidateScores",
    "ConfigError",
    "Decisions",
    "GenerationEmbeddings",
    "ImageEmbeddings",
    "ModelConfig",
    "Pipeline",
    "TextEmbeddings",
    "decision_probabilities",
    "embed_images",
    "embed_prompts",
    "embed_texts",
    "generation_embeddings",
    "list_presets",
    "load_config",
    "load_pipeline",
    "score_candidates",
]
__version__ = "0.1.0"
