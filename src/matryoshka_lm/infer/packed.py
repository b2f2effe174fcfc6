"""Cells (size x bits) that compute from their quantized codes with PyTorch's own CPU kernels.

`precision.at_bits` dequantizes a cell into fp32 weights: the r-bit model reads as many bytes per token as
fp32. Here each Linear of a cell's standalone-shaped view model (engine.view_model) is replaced by a module that
keeps the codes packed and multiplies with a weight-only-quantized kernel (act_dtype bfloat16, the default):

  int4 / int2 / int3   torch._weight_int4pack_mm_for_cpu. Its weight is w = (q - 8) * scale + zero per group of
                       32 (or 64) input features, q in 0..15 (checked: tests/infer/test_packed.py). Our r-bit
                       levels s * (2^k t + (2^k - 1) / 2), k = 8 - r, t in [-2^(r-1), 2^(r-1)), are that with
                       q = t + 8, scale = 2^k s, zero = (2^k - 1) / 2 * s: exact in fp32 (s is an fp16 value).
  int8, groups of 32   the int8 code q = 16 hi + lo (hi = its top 4 bits, the int4 cell's code; lo = q & 15), so
                       s q = [16 s hi + 7.5 s] + [s (lo - 8) + 0.5 s]: two int4 kernels, 8 bits read in all.
  int8, one scale/row  torch._weight_int8pack_mm (it takes one scale per output row only).
  int5..7, or shapes the kernels refuse (N % 16, K % group): the dequantized fp32 weight (precision.at_bits' numerics).

The kernels have a vectorised (AVX-512) path for bf16 activations only; with fp32 activations they are exact but
several times slower than an fp32 matmul (BENCHMARKS.md, quant-speed). `act_dtype` picks: bf16 (the kernels,
fast; the activations and the kernels' scales/zeros round to bf16, so logits move by a few % of their range) or
fp32 (GroupedLinear for every weight and width: int8 codes and a per-group sum, exact to float rounding, faster
than fp32 only compiled).
The engine compiles per-size decode steps; these modules are plain aten calls on buffers, so torch.compile traces
them (no graph break).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from matryoshka_lm.core import nested, precision, quant
from matryoshka_lm.core.model import Linear, MatryoshkaLM
from matryoshka_lm.core.nested import submodel_config
from matryoshka_lm.core.precision import Precision
from matryoshka_lm.core.spec import SubmodelSpec
from matryoshka_lm.errors import MatryoshkaError

INT4_GROUPS = (32, 64)  # group sizes the int4 CPU kernel takes that divide our widths (it also takes 128, 256)
INNER_K_TILES = 2  # the packing layout's K tiling (any of 1, 2, 4, 8 is accepted on CPU)


class PackedLinear(nn.Module):
    """Base: y = x @ W.T for x (..., K), W (N, K) held in some packed form; keeps Linear's call signature."""

    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        if out_features is not None and out_features != self.out_features:
            raise MatryoshkaError("a packed view model computes its own shape only (no further slicing)")
        y = self.matmul(x.reshape(-1, self.in_features))
        return y.view(*x.shape[:-1], self.out_features)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes (N, K) in 0..15 -> the int4 kernel's packed layout (uint8)."""
    return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), INNER_K_TILES)


def scales_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-group (N, G) scale and zero -> the kernel's (G, N, 2) layout."""
    return torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()


class Int4Linear(PackedLinear):
    """Sum over `parts` of int4 matmuls (one part for r <= 4 bits; two for int8 codes: top and low nibbles)."""

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], group: int, act_dtype):
        """parts: (q uint codes 0..15 (N, K), scale (N, G), zero (N, G)) each, fp32 scale/zero."""
        super().__init__()
        self.out_features, self.in_features = parts[0][0].shape
        self.group, self.act_dtype, self.n_parts = group, act_dtype, len(parts)
        for i, (q, scale, zero) in enumerate(parts):
            self.register_buffer(f"w{i}", int4_pack(q), persistent=False)
            self.register_buffer(f"sz{i}", scales_zeros(scale, zero, act_dtype), persistent=False)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        xa = x2d.to(self.act_dtype)
        y = torch._weight_int4pack_mm_for_cpu(xa, self.w0, self.group, self.sz0)
        if self.n_parts == 2:
            y = y + torch._weight_int4pack_mm_for_cpu(xa, self.w1, self.group, self.sz1)
        return y.to(x2d.dtype)


class Int8RowLinear(PackedLinear):
    """int8 codes with one scale per output row: torch._weight_int8pack_mm."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, act_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.act_dtype = act_dtype
        self.register_buffer("w", codes.contiguous(), persistent=False)
        self.register_buffer("s", scale.reshape(-1).to(act_dtype).contiguous(), persistent=False)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x2d.to(self.act_dtype), self.w, self.s).to(x2d.dtype)


class GroupedLinear(PackedLinear):
    """Exact fp32 form, from int8 codes: y = sum_g a_g (x_g . t_g) + b_g sum(x_g) per group g, where the r-bit
    weight is a t + b (a = 2^k s, b = (2^k - 1) / 2 * s). Eager it materialises the codes as floats (slower than
    fp32); torch.compile fuses it into one pass over the int8 codes (faster than fp32, BENCHMARKS.md)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, group: int, bits: int, stored: int):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group = group or self.in_features
        g = self.in_features // self.group
        k = nested.CODE_BITS - bits
        t = nested.top_bits(codes, nested.CODE_BITS - stored + bits)
        scale = scale.float().expand(self.out_features, g)
        self.register_buffer("t", t.reshape(self.out_features, g, self.group).contiguous(), persistent=False)
        self.register_buffer("a", ((1 << k) * scale).contiguous(), persistent=False)
        self.register_buffer("b", (((1 << k) - 1) / 2 * scale).contiguous() if k else None, persistent=False)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        xg = x2d.view(x2d.shape[0], -1, self.group)
        y = (torch.einsum("mgk,ngk->mng", xg, self.t.to(x2d.dtype)) * self.a).sum(-1)
        return y if self.b is None else y + xg.sum(-1) @ self.b.t()


class DenseLinear(PackedLinear):
    """The dequantized fp32 weight (bit widths or shapes no kernel here takes)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("w", weight.contiguous(), persistent=False)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        return F.linear(x2d, self.w)


def int4_parts(
    codes: torch.Tensor, scale: torch.Tensor, bits: int, stored: int = nested.CODE_BITS
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The int4-kernel parts whose sum is the r-bit weight (module doc): one for r <= 4, two for r = 8."""
    if bits == nested.CODE_BITS:
        q = codes.to(torch.int32)
        hi, lo = nested.top_bits(q, 4), nested.low_bits(q, 4)
        return [(hi + 8, 16 * scale, 7.5 * scale), (lo, scale, 0.5 * scale)]
    k = nested.CODE_BITS - bits
    t = nested.top_bits(codes, bits, stored).to(torch.int32)
    return [(t + 8, (1 << k) * scale, ((1 << k) - 1) / 2 * scale)]


def kernel_group(n_out: int, n_in: int, group: int) -> int | None:
    """The int4 kernel's group size for a weight quantized in groups of `group` (0: per row), or None when the
    kernel cannot take its shape (N must divide into 16s, K into groups)."""
    if n_out % 16:
        return None
    if group in INT4_GROUPS and n_in % group == 0:
        return group
    if group == 0:  # one scale per row = the same scale repeated over groups of 32
        return 32 if n_in % 32 == 0 else None
    return None


def packed_linear(
    codes: torch.Tensor, scale: torch.Tensor, group: int, bits: int, act_dtype: torch.dtype, stored: int
) -> PackedLinear:
    """The packed module for one weight's codes (N, K) and scales (N, G) at `bits`: the CPU kernels for bf16
    activations, the exact grouped form for fp32 (module doc)."""
    n_out, n_in = codes.shape
    if act_dtype == torch.float32:
        if n_in % (group or n_in):  # a column prefix ending inside a group
            return DenseLinear(quant.dequantize(codes, scale, group, bits, stored))
        return GroupedLinear(codes, scale, group, bits, stored)
    if bits == nested.CODE_BITS and group == 0 and stored == nested.CODE_BITS:
        return Int8RowLinear(codes, scale, act_dtype)
    kg = kernel_group(n_out, n_in, group)
    if kg is None or bits not in (2, 3, 4, nested.CODE_BITS):
        return DenseLinear(quant.dequantize(codes, scale, group, bits, stored))
    if group == 0:
        scale = scale.expand(n_out, n_in // kg)
    return Int4Linear(int4_parts(codes, scale.float(), bits, stored), kg, act_dtype)


class PackedLM(MatryoshkaLM):
    """A standalone-shaped cell whose Linear modules are packed; its LM head is one too when the quantization
    covers the embeddings (the token table stays fp32 for the lookup: one row per token)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.head: PackedLinear | None = None

    def forward(self, idx, spec=None, cache=None, start=0):
        if self.head is None:
            return super().forward(idx, spec, cache, start)
        if spec is not None and spec.bits not in (None, self.precision.native_bits):
            raise MatryoshkaError(f"this packed model computes at int{self.precision.native_bits} only")
        return self.head(self.hidden_states(idx, spec, cache, start), self.cfg.vocab_size)


@torch.no_grad()
def packed_view(
    model: MatryoshkaLM,
    spec: SubmodelSpec,
    bits: int,
    act_dtype: torch.dtype = torch.bfloat16,
    codes: dict[str, torch.Tensor] | None = None,
) -> PackedLM:
    """The cell (spec's shape, `bits`) as a standalone-shaped model computing from packed codes. Its logits match
    model(x, spec.at_bits(bits)): to float rounding with act_dtype=float32 (GroupedLinear), to bf16 rounding with
    bfloat16 (the int4/int8 kernels).
    `codes`: the model's quantized state when the caller already has it (precision.codes_of), to build many cells."""
    quant.check_bits(bits)
    qcfg = model.precision.quant
    stored = model.precision.code_bits if model.precision.codes is not None else nested.CODE_BITS
    if codes is None:
        codes, stored = precision.codes_of(model)
    if bits > stored:
        raise MatryoshkaError(f"weights stored at int{stored} cannot compute at int{bits}")
    shape = spec.shape
    sliced = quant.slice_qstate(codes, model.cfg, shape)
    with torch.device("meta"):
        sub = PackedLM(submodel_config(model.cfg, shape), rope=(model.rope_cos, model.rope_sin), init=False)
    dense = quant.dequantize_state(sliced, qcfg, bits, stored)  # norms as they are; embeddings as at_bits reads them
    dev = model.rope_cos.device
    sub.load_state_dict({k: v.to(dev) for k, v in dense.items()}, assign=True)
    for name, mod in list(sub.named_modules()):
        if isinstance(mod, Linear) and name != "lm_head":  # the head: below (prefill reads its weight)
            key = name + ".weight"
            packed = packed_linear(sliced[key], sliced[key + quant.SCALE], qcfg.group_size, bits, act_dtype, stored)
            parent, _, attr = name.rpartition(".")
            setattr(sub.get_submodule(parent), attr, packed.to(dev))
    head = "tok_emb.weight" if model.cfg.tie_embeddings else "lm_head.weight"
    if head + quant.SCALE in sliced:
        sub.head = packed_linear(sliced[head], sliced[head + quant.SCALE], qcfg.group_size, bits, act_dtype, stored)
        sub.head.to(dev)
    sub.precision = Precision(native_bits=bits, quant=qcfg)
    return sub.requires_grad_(False).eval()
