"""A Llama-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) whose every forward takes a spec.

Shapes: B batch, T time, C residual width (sliced), V vocab, h query heads, kv key/value heads, hd head size.
The modules are ordinary; which prefix of each weight a size reads is decided in nested.py only, so the
full model and every submodel are the same code, and a standalone extracted model is this class too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import nested
from matryoshka_lm.config import ModelConfig
from .spec import LayerSpec, SubmodelSpec, full_spec


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, hd) in the rotate-half layout that Hugging Face Llama uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, h, T, hd); cos/sin: (T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


@dataclass
class KVCache:
    """Preallocated keys/values per layer, shaped for one spec: (B, kv, max_len, hd)."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(cls, cfg: ModelConfig, spec: SubmodelSpec, batch: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "KVCache":
        shapes = [(batch, nested.kv_heads(l.heads, cfg.group_size), max_len, cfg.head_dim) for l in spec.layers]
        return cls([torch.zeros(s, device=device, dtype=dtype) for s in shapes],
                   [torch.zeros(s, device=device, dtype=dtype) for s in shapes])

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[i][:, :, start:end] = k
        self.v[i][:, :, start:end] = v
        return self.k[i][:, :, :end], self.v[i][:, :, :end]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nested.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, n_heads: int, n_kv_heads: int):
        super().__init__()
        C, hd = cfg.d_model, cfg.head_dim
        self.hd, self.group = hd, n_heads // n_kv_heads
        self.wq = nn.Linear(C, n_heads * hd, bias=False)
        self.wk = nn.Linear(C, n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(C, n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(n_heads * hd, C, bias=False)
        self.heads_out = nn.Identity()  # (B, T, h*hd) per-head outputs before wo: a hook point (reorder.py)

    def forward(self, x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, layer_idx: int, start: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        hd, kv = self.hd, nested.kv_heads(heads, self.group)
        q = nested.linear(x, self.wq.weight, heads * hd).view(B, T, heads, hd).transpose(1, 2)
        k = nested.linear(x, self.wk.weight, kv * hd).view(B, T, kv, hd).transpose(1, 2)
        v = nested.linear(x, self.wv.weight, kv * hd).view(B, T, kv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v, start)
        if mask is not None:  # (B, 1, T, start + T) bool, True = attend: padded batches (engine.py)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv != heads)
        elif start == 0 or T == 1:
            # T == 1 attends to everything cached; start == 0 is a plain causal prefill
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=kv != heads)
        else:  # a chunk after a cached prefix (speculative verification): causal with an offset
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv != heads)
        y = self.heads_out(y.transpose(1, 2).reshape(B, T, heads * hd))
        return nested.linear(y, self.wo.weight, C)


class FeedForward(nn.Module):
    """SwiGLU; MatFormer nests the hidden units: a size keeps the first `ffn` of them."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)
        self.hidden = nn.Identity()  # (B, T, ffn) activations before w_down: a hook point (reorder.py)

    def forward(self, x: torch.Tensor, ffn: int) -> torch.Tensor:
        a = self.hidden(F.silu(nested.linear(x, self.w_gate.weight, ffn)) * nested.linear(x, self.w_up.weight, ffn))
        return nested.linear(a, self.w_down.weight, x.shape[-1])


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        self.idx = i
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, cfg.layer_heads[i], cfg.layer_kv_heads[i])
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.layer_ffn[i])

    def forward(self, x: torch.Tensor, layer: LayerSpec, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, start: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), layer.heads, cos, sin, cache, self.idx, start, mask)
        return x + self.ffn(self.ffn_norm(x), layer.ffn)


class MatryoshkaLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.full = full_spec(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w_down.weight")):  # GPT-2 style residual scaling
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def head_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, idx: torch.Tensor, spec: SubmodelSpec | None = None, cache: KVCache | None = None,
                      start: int = 0, pos: torch.Tensor | None = None, mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Final-normed hidden states (B, T, C_spec) of the submodel `spec` (default: the full model).

        `pos` (B, T) gives per-row RoPE positions and `mask` (B, 1, T, start + T) which cache slots each query
        may attend to; both default to one unpadded sequence at positions start..start+T (left-padded batches
        in engine.py pass them).
        """
        spec = spec or self.full
        B, T = idx.shape
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        x = nested.embed(idx, self.tok_emb.weight, spec.width)
        if pos is None:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        else:  # (B, 1, T, hd): broadcasts over heads
            cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)
        for block, layer in zip(self.layers, spec.layers):
            x = block(x, layer, cos, sin, cache, start, mask)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, spec: SubmodelSpec | None = None, cache: KVCache | None = None,
                start: int = 0, pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) of the submodel `spec`; `cache`/`start` for incremental decoding, `pos`/`mask`
        for padded batches (see hidden_states)."""
        h = self.hidden_states(idx, spec, cache, start, pos, mask)
        return F.linear(h, self.head_weight()[:, : h.shape[-1]])
