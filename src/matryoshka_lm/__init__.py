"""matryoshka-lm: one nested transformer, trained once, served at many sizes.

Layers, each importing only from the ones before it (tests/test_layout.py checks this):
  errors, config, data, machine     foundations (stdlib, numpy, tokenizers)
  core/                             spec, nested slicing, the model, checkpoints
  train/  infer/  convert/          training and evaluation; decoding; extraction and HF
  embed/  study/                    embeddings and retrieval; Mix'n'Match search and studies
  serve/                            the OpenAI-compatible server
  cli/                              the `matryoshka` command
"""
from __future__ import annotations

from matryoshka_lm.config import ModelConfig, TrainConfig, preset
from matryoshka_lm.core.checkpoint import load_model, load_tokenizer, save_model
from matryoshka_lm.core.model import KVCache, MatryoshkaLM
from matryoshka_lm.core.spec import (LayerSpec, SubmodelSpec, count_params, flops_per_token, format_spec, parse_spec,
                                     uniform_spec)
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.sampling import Sampling
from matryoshka_lm.infer.stops import Completion
from matryoshka_lm.infer.speculative import speculative_decode

__version__ = "0.1.0"
__all__ = ["ModelConfig", "TrainConfig", "preset", "MatryoshkaError", "MatryoshkaLM", "KVCache", "LayerSpec",
           "SubmodelSpec", "count_params", "flops_per_token", "format_spec", "parse_spec", "uniform_spec",
           "load_model", "load_tokenizer", "save_model", "Engine", "Sampling", "Completion", "speculative_decode"]
