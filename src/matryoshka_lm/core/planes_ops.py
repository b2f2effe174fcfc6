"""The `matryoshka::planes_linear` operator: y = x @ W_r[:out, :in].T read from 2-bit planes (core/plane_layout.py).

Its CPU kernel is C++ (csrc/planes.cpp, AVX-512 / AVX2 / portable, chosen at run time), built on first use by
`torch.utils.cpp_extension.load` (g++ and ninja; cached under TORCH_EXTENSIONS_DIR) and registered with the
dispatcher, so eager calls cost one dispatch and torch.compile keeps a decode step one graph (the fake kernel below
gives it shapes). Where it cannot build, or with MATRYOSHKA_KERNELS=torch, the same operator runs `reference`, pure
torch on the same planes (equal to float rounding: tests/core/test_planes.py runs both).
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

from .plane_layout import dequantize_planes

SOURCE = Path(__file__).parent / "csrc" / "planes.cpp"
# the C++ side defines the same schema (csrc/planes.cpp, TORCH_LIBRARY)
SCHEMA = "planes_linear(Tensor x, Tensor planes, Tensor scales, int out_features, int bits, int isa=-1) -> Tensor"
ISAS = {"portable": 0, "avx2": 1, "avx512": 2}  # the kernel's `isa` argument; -1: the best this CPU has
_lock = threading.Lock()
_state: dict[str, object] = {}


def reference(
    x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, out_features: int, bits: int
) -> torch.Tensor:
    """The operator in pure torch: dequantize the cell's tiles, blocks and planes (core/plane_layout.py), then
    one matmul."""
    w = dequantize_planes(planes, scales, out_features, x.shape[-1], bits)
    return torch.nn.functional.linear(x.to(torch.float32), w).to(x.dtype)


def _reference_op(x, planes, scales, out_features, bits, isa=-1):
    return reference(x, planes, scales, out_features, bits)


def _fake(x, planes, scales, out_features, bits, isa=-1):
    return x.new_empty(*x.shape[:-1], out_features)


def _build():
    """The compiled extension module, or None (with one warning saying why) where it cannot build."""
    if os.environ.get("MATRYOSHKA_KERNELS") == "torch":
        return None
    try:
        import ninja  # the wheel's binary: on PATH for cpp_extension even when the venv is not activated

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    try:
        from torch.utils.cpp_extension import load

        return load(
            "matryoshka_planes",
            [str(SOURCE)],
            extra_cflags=["-O3", "-std=c++17", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, a build error: the torch reference serves, slower
        warnings.warn(f"matryoshka: the bit-plane kernels did not build ({e}); using the pure-torch path", stacklevel=3)
        return None


def ensure() -> bool:
    """Register the operator (once per process); True when the C++ kernel serves it on CPU."""
    with _lock:
        if "native" in _state:
            return bool(_state["native"])
        ext = _build()
        if ext is None:
            lib = torch.library.Library("matryoshka", "DEF")
            lib.define(SCHEMA)
            lib.impl("planes_linear", _reference_op, "CPU")
        else:
            lib = torch.library.Library("matryoshka", "IMPL")
        lib.impl("planes_linear", _reference_op, "CUDA")  # no GPU kernel yet: the reference, on the device
        torch.library.register_fake("matryoshka::planes_linear", _fake, lib=lib)
        _state.update(native=ext is not None, ext=ext, lib=lib)
        return ext is not None


def native_isa() -> str | None:
    """The instruction set the C++ kernel uses on this CPU ("avx512", "avx2", "portable"), None without it."""
    if not ensure():
        return None
    code = _state["ext"].cpu_isa()
    return next(k for k, v in ISAS.items() if v == code)


def planes_linear(
    x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, out_features: int, bits: int, isa: int = -1
) -> torch.Tensor:
    if not torch.compiler.is_compiling():  # registered before tracing (a lock would break the graph)
        ensure()
    return torch.ops.matryoshka.planes_linear(x, planes, scales, out_features, bits, isa)
