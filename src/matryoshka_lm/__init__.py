"""matryoshka-lm: one nested transformer, trained once, served at many sizes."""
from __future__ import annotations

from .config import ModelConfig, TrainConfig, preset
from .engine import Completion, Engine, Sampling
from .errors import MatryoshkaError
from .model import KVCache, MatryoshkaLM
from .spec import LayerSpec, SubmodelSpec, count_params, flops_per_token, format_spec, parse_spec, uniform_spec
from .speculative import speculative_decode

__version__ = "0.1.0"
__all__ = ["ModelConfig", "TrainConfig", "preset", "MatryoshkaError", "MatryoshkaLM", "KVCache", "LayerSpec",
           "SubmodelSpec", "count_params", "flops_per_token", "format_spec", "parse_spec", "uniform_spec",
           "Engine", "Sampling", "Completion", "speculative_decode"]
