"""fromage_gill: ground a frozen language model to images (FROMAGe, GILL, MAGIC).

import fromage_gill as fg
pipe = fg.load_pipeline("tiny-gill")        # offline, seeded random weights
pipe = fg.load_pipeline("gill", quantization="8bit")   # the published model on a GPU
"""

from .config import ConfigError, ModelConfig, list_presets, load_config
from .pipeline import Pipeline, load_pipeline

__all__ = ["ConfigError", "ModelConfig", "Pipeline", "list_presets", "load_config", "load_pipeline"]
__version__ = "0.1.0"
