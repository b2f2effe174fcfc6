"""One resident copy of a quantized weight, as bit-planes (core/plane_layout.py) that the kernel (core/planes_ops.py)
reads in place: the module layers hold, one per linear and embedding."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import nested, planes_ops, quant
from .plane_layout import BLOCK, TILE, dequantize_planes, fits_planes, pack, plane_values


class Planes(nn.Module):
    """A quantized weight (N, K) held once; `linear(x, out, bits)` computes x @ W_r[:out, :in].T with
    in = x.shape[-1], `rows` looks rows up (an embedding). Held as bit-planes for the kernel when its groups map
    onto blocks of 32 columns (the default group is 32); groups smaller than a block (tests' tiny models) keep the
    int8 codes and compute on their dequantized prefix, the same values. Buffers are not persistent: checkpoints
    keep storing the int8 codes."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, group: int):
        super().__init__()
        self.shape = tuple(codes.shape)
        self.group = group
        self.kernel = fits_planes(group, codes.shape[1])
        if self.kernel:
            planes, s = pack(codes, scales, group)
        else:
            planes, s = codes.contiguous(), scales.to(torch.float16).contiguous()
        self.register_buffer("planes", planes, persistent=False)
        # fp16 scales kept as their int16 bit patterns, so a model.to(dtype) or .float() leaves them as they are
        self.register_buffer("scales", s.view(torch.int16), persistent=False)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, group={self.group}, {'planes' if self.kernel else 'int8 codes'}"

    def weight(self, out_features: int, in_features: int, bits: int) -> torch.Tensor:
        """The cell's fp32 weight (out, in) at `bits` (what linear multiplies by)."""
        if self.kernel:
            return dequantize_planes(self.planes, self.scales, out_features, in_features, bits)
        q = nested.prefix(self.planes, (out_features, in_features))
        s = nested.prefix(self.scales.view(torch.float16), (out_features, -(-in_features // self.group)))
        return quant.dequantize(q, s.float(), self.group, bits)

    def linear(self, x: torch.Tensor, out_features: int, bits: int) -> torch.Tensor:
        if not self.kernel:
            return F.linear(x, self.weight(out_features, x.shape[-1], bits).to(x.dtype))
        if x.device.type != "cpu" or torch.is_grad_enabled() and x.requires_grad:
            return planes_ops.reference(x, self.planes, self.scales, out_features, bits)
        return planes_ops.planes_linear(x, self.planes, self.scales, out_features, bits)

    def rows(self, idx: torch.Tensor, width: int, bits: int) -> torch.Tensor:
        """Embedding lookup: the first `width` columns of rows `idx` at `bits` (decodes only those rows' tiles)."""
        if not self.kernel:
            return F.embedding(idx, self.weight(self.shape[0], width, bits))
        tiles = torch.div(idx, TILE, rounding_mode="floor")
        uniq, inv = torch.unique(tiles.reshape(-1), return_inverse=True)
        w = dequantize_planes(self.planes[uniq], self.scales[uniq], uniq.numel() * TILE, width, bits)
        return w.view(uniq.numel(), TILE, width)[inv, (idx % TILE).reshape(-1)].view(*idx.shape, width)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 codes (N, K) and group scales (N, K / group) this holds (pack's inverse, exactly)."""
        n, k = self.shape
        if not self.kernel:
            return self.planes, self.scales.view(torch.float16).float()
        u = nested.unsigned_top(plane_values(self.planes), nested.CODE_BITS)
        q = nested.prefix((u - 128).to(torch.int8), self.shape)
        s = self.scales.view(torch.float16).transpose(1, 2).reshape(-1, self.scales.shape[1]).float()
        g = self.group or k
        return q.contiguous(), nested.prefix(s[:, :: max(1, g // BLOCK)], (n, k // g))

    def nbytes(self) -> int:
        return self.planes.nbytes + self.scales.nbytes
