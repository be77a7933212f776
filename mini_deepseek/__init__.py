"""mini_deepseek: a readable DeepSeek-V3, from a laptop toy to the published 671B configuration."""

from .checkpoint import from_pretrained, save_pretrained
from .config import PRESETS, ModelConfig
from .data import (
    TokenDataset,
    arithmetic_problems,
    arithmetic_text,
    check_answer,
    stdlib_corpus,
    text_files_corpus,
)
from .model import DeepSeekV3
from .params import ParamCount, count_params
from .tokenizer import ByteTokenizer
from .train import TrainConfig, latest_checkpoint, load_checkpoint, save_checkpoint, train

__version__ = "0.1.0"
__all__ = [
    "PRESETS", "ByteTokenizer", "DeepSeekV3", "ModelConfig", "ParamCount", "TokenDataset", "TrainConfig",
    "__version__", "arithmetic_problems", "arithmetic_text", "check_answer", "count_params", "latest_checkpoint",
    "from_pretrained", "load_checkpoint", "save_checkpoint", "save_pretrained", "stdlib_corpus", "text_files_corpus",
    "train",
]
