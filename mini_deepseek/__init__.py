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
from .fp8 import FP8Linear, FP8RoutedExperts, quantize_to_fp8
from .fp8_training import FP8TrainingExperts, FP8TrainingLinear, convert_to_fp8_training
from .kernel_switch import set_kernels
from .model import DeepSeekV3
from .params import ParamCount, count_params
from .speculative import speculative_generate
from .tokenizer import ByteTokenizer
from .train import TrainConfig, latest_checkpoint, load_checkpoint, save_checkpoint, train

__version__ = "0.1.0"
__all__ = [
    "PRESETS", "ByteTokenizer", "DeepSeekV3", "FP8Linear", "FP8RoutedExperts", "FP8TrainingExperts",
    "FP8TrainingLinear", "ModelConfig", "ParamCount", "TokenDataset", "TrainConfig", "__version__",
    "arithmetic_problems", "arithmetic_text", "check_answer", "convert_to_fp8_training", "count_params", "latest_checkpoint", "from_pretrained", "load_checkpoint", "quantize_to_fp8", "save_checkpoint",
    "save_pretrained", "set_kernels", "speculative_generate", "stdlib_corpus", "text_files_corpus", "train",
]
