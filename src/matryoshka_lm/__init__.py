"""matryoshka-lm: one nested transformer, trained once, served at many sizes.

Layers, each importing only from the ones before it (tests/test_layout.py checks this):
  errors, config, data, machine, plots  foundations (stdlib, numpy, tokenizers, matplotlib)
  core/  report                     spec, nested slicing, the model, checkpoints; the report kit (md_table, figure)
  train/  infer/  convert/          training and evaluation; decoding and the size router; extraction and HF
  embed/  eval/  mixnmatch/         embeddings and retrieval; lm-eval at every size; Mix'n'Match search
  study/  elastify/  serve/         experiments over sizes; a pretrained LM made elastic; the server
  cli/                              the `matryoshka` command
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it; imported on first use (PEP 562) so that `matryoshka --help` and
# `import matryoshka_lm.config` do not pay for torch
_EXPORTS = {
    "ModelConfig": "config",
    "TrainConfig": "config",
    "preset": "config",
    "MatryoshkaError": "errors",
    "load_model": "core.checkpoint",
    "load_tokenizer": "core.checkpoint",
    "save_model": "core.checkpoint",
    "KVCache": "core.model",
    "MatryoshkaLM": "core.model",
    "LayerSpec": "core.spec",
    "SubmodelSpec": "core.spec",
    "count_params": "core.spec",
    "flops_per_token": "core.spec",
    "format_spec": "core.spec",
    "parse_spec": "core.spec",
    "uniform_spec": "core.spec",
    "Engine": "infer.engine",
    "Request": "infer.request",
    "Stops": "infer.request",
    "Sampling": "infer.sampling",
    "Speculation": "infer.speculative",
    "Completion": "infer.stops",
    "speculative_decode": "infer.speculative",
}

if TYPE_CHECKING:
    from matryoshka_lm.config import ModelConfig, TrainConfig, preset  # noqa: F401
    from matryoshka_lm.core.checkpoint import load_model, load_tokenizer, save_model  # noqa: F401
    from matryoshka_lm.core.model import KVCache, MatryoshkaLM  # noqa: F401
    from matryoshka_lm.core.spec import (  # noqa: F401
        LayerSpec,
        SubmodelSpec,
        count_params,
        flops_per_token,
        format_spec,
        parse_spec,
        uniform_spec,
    )
    from matryoshka_lm.errors import MatryoshkaError  # noqa: F401
    from matryoshka_lm.infer.engine import Engine  # noqa: F401
    from matryoshka_lm.infer.request import Request, Stops  # noqa: F401
    from matryoshka_lm.infer.sampling import Sampling  # noqa: F401
    from matryoshka_lm.infer.speculative import Speculation, speculative_decode  # noqa: F401
    from matryoshka_lm.infer.stops import Completion  # noqa: F401

__version__ = "0.1.0"
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'matryoshka_lm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"matryoshka_lm.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
