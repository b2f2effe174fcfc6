"""`matryoshka quantize --calibrate N`: nested int8 codes chosen by GPTQ (convert/gptq.py) from the model's own
activations on N windows of the corpus's training split, instead of rounding each weight to nearest.

The Hessians come from one pass of the fp32 model (every layer sees unquantized inputs): a sequential pass would
have to pick which bit width's outputs feed the next layer, and every width is served. Linears that read the same
input share one Hessian (wq/wk/wv, w_gate/w_up) and are quantized as one stacked matrix (GPTQ treats rows
independently, so this is exact). The token embedding and LM head, when quantized, stay round-to-nearest.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from matryoshka_lm.core import quant
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.errors import MatryoshkaError

from . import gptq

log = logging.getLogger(__name__)

# linears quantized together because they read the same input (the first one's input is the one recorded)
STACKS = (("attn.wq", "attn.wk", "attn.wv"), ("attn.wo",), ("ffn.w_gate", "ffn.w_up"), ("ffn.w_down",))
REPORT = "calibration.json"  # written beside a calibrated checkpoint's weights: how its codes were chosen


@dataclass(frozen=True)
class Calibration:
    windows: int = 128  # sequences of the corpus's training split
    seq_len: int = 512
    data: str | None = None  # corpus path (as `train --data` reads it); None: the default corpus
    max_chars: int = 3_000_000  # of the corpus encoded to draw windows from
    weights: dict[int, float] = field(default_factory=lambda: dict(gptq.DEFAULT_WEIGHTS))

    def __post_init__(self) -> None:
        if self.windows < 1 or self.seq_len < 2:
            raise MatryoshkaError(f"calibration needs >= 1 window of >= 2 tokens, got {self.windows} x {self.seq_len}")
        bad = [b for b in self.weights if b not in quant.BIT_WIDTHS or self.weights[b] < 0]
        if bad or quant.CODE_BITS not in self.weights:
            raise MatryoshkaError(
                f"calibration weights need int8 and widths 2..8 with weights >= 0, got {self.weights}"
            )


def calibration_windows(tok, cal: Calibration, max_seq_len: int) -> torch.Tensor:
    """(windows, seq_len) token ids, evenly spaced over the training split (deterministic)."""
    from matryoshka_lm.data import train_split_tokens

    seq = min(cal.seq_len, max_seq_len)
    tokens = train_split_tokens(tok, cal.data, cal.max_chars)
    if len(tokens) < seq:
        raise MatryoshkaError(f"the calibration corpus has {len(tokens)} tokens, fewer than one window of {seq}")
    starts = np.linspace(0, len(tokens) - seq, cal.windows).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s : s + seq].astype(np.int64) for s in starts]))


@torch.no_grad()
def input_hessians(model: MatryoshkaLM, windows: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """{'layers.i.attn.wq' (a stack's first linear): H = sum of x x^T over every token of every window}."""
    hess: dict[str, torch.Tensor] = {}
    hooks = []

    def record(name: str):
        def hook(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            h = x.T @ x
            hess[name] = hess[name] + h if name in hess else h

        return hook

    for i, layer in enumerate(model.layers):
        for stack in STACKS:
            name = f"layers.{i}.{stack[0]}"
            hooks.append(layer.get_submodule(stack[0]).register_forward_pre_hook(record(name)))
    try:
        for b in tqdm(range(0, len(windows), batch), desc="calibration activations", unit="batch", leave=False):
            model.hidden_states(windows[b : b + batch])  # the LM head's logits are not needed
    finally:
        for h in hooks:
            h.remove()
    return hess


def calibrate_state(
    model: MatryoshkaLM,
    qstate: dict[str, torch.Tensor],
    qcfg: quant.QuantConfig,
    hess: dict[str, torch.Tensor],
    weights: dict[int, float] | None = None,
) -> dict[str, torch.Tensor]:
    """qstate (round-to-nearest codes and scales) with every linear's codes and scales replaced by nested GPTQ's."""
    out = dict(qstate)
    state = model.state_dict()
    jobs = [(i, stack) for i in range(len(model.layers)) for stack in STACKS]
    for i, stack in tqdm(jobs, desc="nested GPTQ", unit="matrix", leave=False):
        names = [f"layers.{i}.{lin}.weight" for lin in stack]
        w = torch.cat([state[n].float() for n in names])
        codes, scales = gptq.nested_gptq(w, hess[f"layers.{i}.{stack[0]}"], qcfg.group_size, weights)
        rows = [state[n].shape[0] for n in names]  # un-stack (not a size's prefix: each linear's own rows)
        for n, c, sc in zip(names, codes.split(rows), scales.split(rows)):
            out[n], out[n + quant.SCALE] = c.contiguous(), sc.contiguous()
    return out


def calibrated_qstate(
    model: MatryoshkaLM,
    tok,
    qstate: dict[str, torch.Tensor],
    qcfg: quant.QuantConfig,
    cal: Calibration,
    hess: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """(qstate, the round-to-nearest codes of `model`'s weights, with calibrated linears; a report of how).
    `hess`: input_hessians of these windows computed before (to compare settings without a second pass)."""
    t0 = time.perf_counter()
    model = model.eval()
    seq = min(cal.seq_len, model.cfg.max_seq_len)
    if hess is None:  # given: they were measured on these windows already (no second pass over the corpus)
        hess = input_hessians(model, calibration_windows(tok, cal, model.cfg.max_seq_len))
    qstate = calibrate_state(model, qstate, qcfg, hess, cal.weights)
    report = {**asdict(cal), "tokens": cal.windows * seq, "seconds": round(time.perf_counter() - t0, 1)}
    report["weights"] = {str(b): w for b, w in cal.weights.items()}
    log.info("calibrated on %d windows of %d tokens in %.0f s", cal.windows, seq, report["seconds"])
    return qstate, report


def read_report(ckpt: str | Path) -> dict | None:
    p = Path(ckpt) / REPORT
    return json.loads(p.read_text()) if p.is_file() else None
