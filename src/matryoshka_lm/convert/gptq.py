"""One weight's int8 codes chosen so that their top bits are good at every width: GPTQ (Frantar et al., 2023)
with one error-feedback trajectory per bit width and one shared code.

GPTQ quantizes the columns of W (out, in) left to right and moves each column's rounding error onto the columns not
yet quantized, weighted by the inverse Hessian H^-1 of the layer's inputs (H = X^T X): what minimises the layer's
output error ||X W^T - X Q^T||^2 rather than the weights' own error. A nested code serves several widths at once
(the r-bit model reads the top r bits, core/nested.py), so here every width r keeps its own copy W_r of the weights
being compensated, and column j's code q is the int8 value minimising

    sum_r  lambda_r * (W_r[:, j] / s - level_r(q))^2           level_r(q) = nested.bit_levels(top r bits of q)

after which each W_r takes its own error feedback. lambda_8 = 1 with small weights on the narrow widths keeps int8
close to round-to-nearest while pulling the top bits towards what int4/int3 need: MatGPTQ (arXiv 2602.03537)
optimises several precisions jointly in the same way. Columns keep their order (no act-order), so a column prefix
(a narrower residual or FFN width) is still quantized before the columns that compensate it.
"""

from __future__ import annotations

import torch

from matryoshka_lm.core import nested, quant

# relative weight of each width's output error (in int8 units, so int4's typical error already counts ~256x int8's):
# on SmolLM2 these beat {8: 1, 6: .25, 4: .05, 3: .02, 2: .005} at int8, int6, int4 and int3 (BENCHMARKS.md)
DEFAULT_WEIGHTS = {8: 1.0, 6: 0.5, 4: 0.25, 3: 0.1, 2: 0.01}
BLOCK = 128  # columns per lazy update (GPTQ's batching: the rest of W is updated once per block)
# a group's scale as a fraction of absmax / 127: shrinking it clips int8's largest weights but moves the narrow
# widths' levels onto the bulk of the weights; each row takes the fraction with the least weighted error
SCALE_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
DAMP = 0.01  # of the mean diagonal, added to H so that its inverse exists


def level_table(bits: list[int]) -> torch.Tensor:
    """(len(bits), 256): the int8-scale value each int8 code q = -128..127 reads at each width."""
    q = torch.arange(-128, 128, dtype=torch.int32)
    return torch.stack([nested.bit_levels(nested.top_bits(q, b), b) for b in bits])


def inverse_hessian_factor(h: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of (H + damping)^-1 that GPTQ's error feedback reads (float64 for stability)."""
    h = h.double().clone()
    h[dead, dead] = 1.0
    h.diagonal().add_(DAMP * h.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()


def best_codes(targets: torch.Tensor, lam: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """targets (R, out) in units of the scale, R widths with int8 first -> (out,) code indices 0..255 minimising
    sum_r lam_r (t_r - L_r[q])^2. Exact without scoring all 256 codes: every term is >= 0, so a code q beats the
    int8 rounding q0 only if lam_8 (t_8 - q)^2 <= cost(q0), which bounds |q - t_8| (a few codes in practice)."""

    def cost(k: torch.Tensor) -> torch.Tensor:  # (out, K) code indices -> (out, K) weighted error
        return (lam[:, None, None] * (targets[:, :, None] - table[:, k]) ** 2).sum(0)

    q0 = (targets[0].round() + 128).clamp(0, 255).long()
    radius = int((cost(q0[:, None]).max() / lam[0]).sqrt().ceil()) + 1
    offsets = torch.arange(-radius, radius + 1)
    cand = (q0[:, None] + offsets).clamp(0, 255)
    return cand.gather(1, cost(cand).argmin(1, keepdim=True))[:, 0]


def group_scales(wg: torch.Tensor, dh: torch.Tensor, weights: dict[int, float], grid) -> torch.Tensor:
    """Scales (out,) for one group: wg (R, g, out) its columns in every width's trajectory (widest first), dh (g,)
    the Hessian's diagonal there (how much each input matters). Per row, the grid fraction of absmax / 127 with the
    least sum over widths of lambda_r * sum_j dh_j (w - w^_r)^2, w^_r each width's own nearest level (a cheap proxy
    of the shared code)."""
    best, best_err = None, None
    for f in grid:
        s = quant.scales_of(f * wg[0].T, 0)[:, 0]  # f * absmax / 127, as quantize rounds a scale (fp16, never 0)
        err = sum(
            lam * (dh[:, None] * (w - s * nested.nearest_level(w / s, b)) ** 2).sum(0)
            for w, (b, lam) in zip(wg, sorted(weights.items(), reverse=True))
        )
        if best is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def nested_gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    group: int,
    weights: dict[int, float] | None = None,
    scale_grid: tuple[float, ...] = SCALE_GRID,
) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in) and its inputs' H (in, in) -> (int8 codes (out, in), scales (out, in / group)) as quant.quantize
    returns them; each group's scales are chosen at its start from the trajectories (group_scales; a grid of (1.0,)
    is absmax / 127 of the int8 one)."""
    weights = weights or DEFAULT_WEIGHTS
    bits = sorted(weights, reverse=True)
    if bits[0] != nested.CODE_BITS:
        raise ValueError(f"the widths' weights must include int{nested.CODE_BITS}, got {sorted(weights)}")
    lam = torch.tensor([weights[b] for b in bits])
    table = level_table(bits)
    n_out, n_in = w.shape
    g = group or n_in
    dead = h.diagonal() == 0
    u = inverse_hessian_factor(h, dead)
    # W_r for every width, transposed (R, in, out): a column of W is a contiguous row here
    traj = w.detach().float().T.contiguous().expand(len(bits), n_in, n_out).clone()
    traj[:, dead] = 0
    codes = torch.zeros(n_in, n_out, dtype=torch.int8)
    scales = torch.zeros(n_in // g, n_out)
    for b0 in range(0, n_in, BLOCK):
        b1 = min(b0 + BLOCK, n_in)
        blk = traj[:, b0:b1].clone()
        for j in range(b1 - b0):
            col = b0 + j
            if col % g == 0:  # the group's columns as compensated so far (in this block, or beyond it)
                wg = blk[:, j : j + g] if j + g <= b1 - b0 else traj[:, col : col + g]
                scales[col // g] = group_scales(wg, h.diagonal()[col : col + g].float(), weights, scale_grid)
            s = scales[col // g]
            k = best_codes(blk[:, j] / s, lam, table)
            codes[col] = (k - 128).to(torch.int8)
            e = (blk[:, j] - s * table[:, k]) / u[col, col]
            blk[:, j + 1 :] -= u[col, col + 1 : b1][None, :, None] * e[:, None, :]
            blk[:, j] = e
        traj[:, b1:] -= torch.einsum("kb,rbo->rko", u[b0:b1, b1:].T.contiguous(), blk)
    codes, scales = codes.T.contiguous(), scales.T.contiguous()
    return codes, scales


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - W^) H (W - W^)^T): the summed squared output error of the layer on the inputs H was built from."""
    d = (w - w_hat).double()
    return float(((d @ h.double()) * d).sum())
