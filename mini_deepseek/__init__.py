"""mini_deepseek: a readable DeepSeek-V3, from a laptop toy to the published 671B configuration."""

from .config import PRESETS, ModelConfig
from .model import DeepSeekV3
from .params import ParamCount, count_params

__version__ = "0.1.0"
__all__ = ["PRESETS", "DeepSeekV3", "ModelConfig", "ParamCount", "count_params", "__version__"]
