"""The bit-plane layout of a quantized weight: every cell (rows, columns, bits) reads its bytes in place.

The int8 code q of each weight is held as u = q + 128 split into four planes of 2 bits (most significant first),
so a cell at r bits reads planes 0..ceil(r/2)-1 only: int2 a quarter of the code bytes, int4 half, int6 three
quarters, int8 all (odd widths read one bit more, which the kernel masks off). Planes of 2 bits rather than nibbles
because int2 and int4 are both cells we serve; single bit-planes (Any-Precision LLM) would give int3/5/7 exactly but
cost twice the decode work per weight on a CPU.

Layout (the kernel's, csrc/planes.cpp): rows in tiles of 16, columns in blocks of 32 with one fp16 scale per row
and block; (tile, block) holds its 4 planes x 128 bytes contiguously, byte 16e + r of a plane holding at bits 2f
the plane's bits of row r, column 8f + e. A row prefix [:out] is a prefix of tiles and a column prefix [:, :in]
(w_down, wo, a narrower LM head) a prefix of blocks within each tile, so a cell's bytes are runs of
ceil(r/2) x 128 bytes per (tile, block) — no column prefix is strided. Weights are padded to whole tiles and
blocks (padding is never read into an output: padded columns meet zero activations, padded rows are dropped).
Resident: N K bytes of planes plus N K / 16 bytes of scales: what the int8 checkpoint stores, no fp32 copy.
"""

from __future__ import annotations

import torch

from matryoshka_lm.errors import MatryoshkaError

from . import nested

TILE, BLOCK, N_PLANES = 16, 32, nested.CODE_BITS // nested.PLANE_BITS
PLANE_BYTES = TILE * BLOCK * nested.PLANE_BITS // 8  # 128


def block_scales(scales: torch.Tensor, group: int, n_in: int) -> torch.Tensor:
    """Per-group scales (N, n_in / group) -> one per block of 32 columns (N, ceil(n_in / 32)): the same values,
    since a group of 32k columns is k blocks (group 0 = one scale per row)."""
    g = group or n_in
    if g % BLOCK and g != n_in:
        raise MatryoshkaError(f"bit-planes need quantization groups of a multiple of {BLOCK} columns, got {g}")
    cols = scales.repeat_interleave(g, dim=1)
    return cols[:, ::BLOCK]


def pack(codes: torch.Tensor, scales: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (N, K) and their group scales -> planes (T, G, 4, 128) uint8 and scales (T, G, 16) fp16."""
    n, k = codes.shape
    t, g = -(-n // TILE), -(-k // BLOCK)
    q = torch.zeros(t * TILE, g * BLOCK, dtype=torch.int8, device=codes.device)
    q[:n, :k] = codes
    s = torch.ones(t * TILE, g, dtype=torch.float16, device=codes.device)
    s[:n] = block_scales(scales.float(), group, k).to(torch.float16)
    planes = []
    for p in range(N_PLANES):
        v = nested.code_plane(q, p).view(t, TILE, g, 4, 8)  # (tile, r, block, f, e)
        planes.append(nested.pack_fields(v.permute(0, 2, 4, 1, 3)).reshape(t, g, PLANE_BYTES))  # (tile, block, e, r)
    return torch.stack(planes, dim=2).contiguous(), s.view(t, TILE, g).transpose(1, 2).contiguous()


def plane_values(planes: torch.Tensor) -> list[torch.Tensor]:
    """(t, g, np, 128) planes -> per plane its 2-bit values as (t * 16, g * 32) int32, rows by columns."""
    t, g, n_planes, _ = planes.shape
    out = []
    for p in range(n_planes):
        f = nested.unpack_fields(planes[:, :, p].reshape(t, g, 8, TILE))  # (tile, block, e, r, f)
        out.append(f.permute(0, 3, 1, 4, 2).reshape(t * TILE, g * BLOCK))
    return out


def dequantize_planes(planes: torch.Tensor, scales: torch.Tensor, out_features: int, in_features: int, bits: int):
    """The cell's fp32 weight (out, in) at `bits`, from the bytes it reads (the kernel's reference)."""
    p, s = nested.plane_prefix(planes, scales, out_features, in_features, bits, TILE, BLOCK)
    c = nested.unsigned_top(plane_values(p), bits).float()
    s_cols = s.view(torch.float16).transpose(1, 2).reshape(-1, s.shape[1]).float().repeat_interleave(BLOCK, dim=1)
    return nested.prefix(s_cols * (c + nested.plane_offset(bits)), (out_features, in_features))


def fits_planes(group: int, n_in: int) -> bool:
    """Whether groups of `group` columns (0: per row) map onto blocks of 32 (else the codes stay int8, below)."""
    g = group or n_in
    return g % BLOCK == 0 or g == n_in
