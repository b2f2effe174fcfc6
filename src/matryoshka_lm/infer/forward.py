"""The forward passes a decoder makes (gpt-fast's prefill / decode_one_token, plus the early-exit and verify
passes of speculative decoding), each a plain function so that torch.compile traces it whole; and the view model a
size decodes on."""

from __future__ import annotations

from dataclasses import replace

import torch

from matryoshka_lm.core import nested
from matryoshka_lm.core.model import KVCache, MatryoshkaLM
from matryoshka_lm.core.nested import submodel_config
from matryoshka_lm.core.spec import SubmodelSpec


def prefill(model: MatryoshkaLM, idx: torch.Tensor, spec: SubmodelSpec, cache: KVCache) -> torch.Tensor:
    """Run prompts (B, P) through `spec`, filling cache slots 0..P; logits (B, V) of the last slot only."""
    h = model.hidden_states(idx, spec, cache, 0)[:, -1:]
    return model.logits(h, spec.bits)[:, -1]


def decode_one_token(
    model: MatryoshkaLM, tok: torch.Tensor, spec: SubmodelSpec | None, cache: KVCache, slot: int | torch.Tensor
) -> torch.Tensor:
    """One step for the whole batch: tokens (B,) into cache slot `slot` (an int, or a tensor (1,) for the
    static shapes of compiled decoding: MatryoshkaLM.hidden_states); next-token logits (B, V)."""
    return model(tok.view(-1, 1), spec, cache, slot)[:, -1]


def forward_chunk(
    model: MatryoshkaLM, idx: torch.Tensor, spec: SubmodelSpec | None, cache: KVCache, start: int | torch.Tensor
) -> torch.Tensor:
    """Tokens (B, T) into slots start..start+T after a cached prefix; logits (B, T, V) (speculative verify)."""
    return model(idx, spec, cache, start)


def exit_state(
    model: MatryoshkaLM, tok: torch.Tensor, draft: SubmodelSpec, cache: KVCache, slot: int | torch.Tensor
) -> torch.Tensor:
    """Early exit: token (1,) through the draft's layers (the target's first k) into the target's cache; the
    residual stream after layer k (1, 1, C), before the final norm (drafts.EarlyExitDraft)."""
    return model.hidden_states(tok.view(1, 1), draft, cache, slot, norm=False)


def exit_step(
    model: MatryoshkaLM, tok: torch.Tensor, draft: SubmodelSpec, cache: KVCache, slot: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """exit_state plus the draft's next-token logits (1, V) from the shared final norm and head."""
    h = exit_state(model, tok, draft, cache, slot)
    return h, model.logits(model.norm(h), draft.bits)[:, -1]


def resume_chunk(
    model: MatryoshkaLM, h: torch.Tensor, spec: SubmodelSpec, cache: KVCache, start: int | torch.Tensor, k: int
) -> torch.Tensor:
    """States (1, T, C) after layer k of tokens at slots start..start+T through layers k+1..L; logits (1, T, V)."""
    return model.logits(model.hidden_states(None, spec, cache, start, h=h, first_layer=k), spec.bits)


@torch.no_grad()
def view_model(model: MatryoshkaLM, spec: SubmodelSpec) -> MatryoshkaLM:
    """A standalone-shaped model of `spec` whose parameters are views of `model`'s: no weight is copied (built
    uninitialised on the meta device, then the views are assigned), and each slice is taken once instead of at
    every call. It shares the model's RoPE tables too. Nothing global is patched, so models may be built on
    other threads meanwhile."""
    with torch.device("meta"):  # thread-local
        sub = MatryoshkaLM(submodel_config(model.cfg, spec), rope=(model.rope_cos, model.rope_sin), init=False)
    views = nested.slice_views(dict(model.named_parameters()), model.cfg, spec)
    sub.load_state_dict({k: v.detach() for k, v in views.items()}, assign=True)
    sub.precision = replace(model.precision, frozen=True, planes_key=None)  # computes at its model's precisions
    share_planes(model, sub)
    return sub.requires_grad_(False).eval()


def share_planes(model: MatryoshkaLM, sub: MatryoshkaLM) -> None:
    """Give a view model its parent's bit-planes, shared whole (a cell reads its prefix at every call). Call again
    once the parent has built planes it lacked (an fp32 model builds them on its first cell, precision.ensure_planes;
    a rebuild updates them in place, so views stay current)."""
    for name, mod in sub.named_modules():
        planes = getattr(model.get_submodule(name), "planes", None) if hasattr(mod, "planes") else None
        if planes is not None:
            mod.planes = planes
    sub.precision.planes_key = model.precision.planes_key


def left_padded(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts as one (B, P) tensor, shorter ones left-padded with 0, and the pad slots of each row (B,)
    (None when all have the same length)."""
    lengths = [len(p) for p in prompts]
    P = max(lengths)
    idx = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, P - len(p) :] = torch.tensor(p)
    pad = torch.tensor([P - n for n in lengths], device=device) if len(set(lengths)) > 1 else None
    return idx.to(device), pad
