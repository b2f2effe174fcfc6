"""A Llama-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) whose every forward takes a spec.

Shapes: B batch, T time, C residual width (sliced), V vocab, h query heads, kv key/value heads, hd head size,
L cache slots.
The modules are ordinary; which prefix of each weight a size reads is decided in nested.py only, so the
full model and every submodel are the same code, and a standalone extracted model is this class too.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.errors import MatryoshkaError

from . import nested, precision
from .planes import Planes
from .precision import Precision
from .spec import LayerSpec, SubmodelSpec, full_spec

RopeTables = tuple[torch.Tensor, torch.Tensor]


def rope_tables(head_dim: int, max_len: int, theta: float) -> RopeTables:
    """cos/sin tables (max_len, hd) in the rotate-half layout that Hugging Face Llama uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, h, T, hd); cos/sin: (T, hd) or (B, 1, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys/values per layer, shaped for one spec: (B, kv, L, hd); optionally left padding.

    Row b's tokens fill slots pad[b].. and slot s holds RoPE position s - pad[b] (`pad` None: no padding).
    A module, so that compiled code treats its tensors as static addresses (CUDA graphs write into them in place).
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], pad: torch.Tensor | None = None):
        super().__init__()
        self.k, self.v, self.pad = k, v, pad

    @classmethod
    def allocate(
        cls,
        cfg: ModelConfig,
        spec: SubmodelSpec,
        batch: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        pad: torch.Tensor | None = None,
    ) -> KVCache:
        shapes = [(batch, nested.kv_heads(l.heads, cfg.group_size), max_len, cfg.head_dim) for l in spec.layers]
        return cls(
            [torch.zeros(s, device=device, dtype=dtype) for s in shapes],
            [torch.zeros(s, device=device, dtype=dtype) for s in shapes],
            pad,
        )

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def update(
        self, i: int, k: torch.Tensor, v: torch.Tensor, at: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer i's keys/values (B, kv, T, hd) at slots at..at+T (`at` an int) or at the slots `at` (T,)
        (a tensor, written in place); return what to attend to: the slots up to the new ones, or all L slots
        (then the shapes do not depend on the position)."""
        if isinstance(at, torch.Tensor):
            return self.k[i].index_copy_(2, at, k), self.v[i].index_copy_(2, at, v)
        end = at + k.shape[2]
        self.k[i][:, :, at:end] = k
        self.v[i][:, :, at:end] = v
        return self.k[i][:, :, :end], self.v[i][:, :, :end]


class Linear(nn.Linear):
    """nn.Linear without bias that can skip its initialisation (view models assign their weights afterwards;
    initialising on the meta device would import sympy & co., ~70 MB, for values thrown away at once)."""

    def __init__(self, in_features: int, out_features: int, init: bool = True):
        self.init = init  # read by reset_parameters, which nn.Linear.__init__ calls
        super().__init__(in_features, out_features, bias=False)
        self.planes: Planes | None = None  # the weight's codes as bit-planes (precision.py), for cells with bits

    def reset_parameters(self) -> None:
        if self.init:
            super().reset_parameters()

    def forward(self, x: torch.Tensor, out_features: int | None = None, bits: int | None = None) -> torch.Tensor:
        """x @ W[:out, :in].T (nested.linear); at `bits`, from the planes (the r-bit weights, same prefixes)."""
        out = self.out_features if out_features is None else out_features
        if bits is None:
            return nested.linear(x, self.weight, out)
        if self.planes is None:
            raise MatryoshkaError("this linear has no codes for a bit width (precision.ensure_planes builds them)")
        return self.planes.linear(x, out, bits)


class Embedding(nn.Embedding):
    """nn.Embedding that can skip its initialisation (see Linear); `planes` as Linear's (quantized embeddings)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init: bool = True):
        self.init = init
        super().__init__(num_embeddings, embedding_dim)
        self.planes: Planes | None = None

    def reset_parameters(self) -> None:
        if self.init:
            super().reset_parameters()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nested.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, n_heads: int, n_kv_heads: int, init: bool = True):
        super().__init__()
        C, hd = cfg.d_model, cfg.head_dim
        self.hd, self.group = hd, n_heads // n_kv_heads
        self.wq = Linear(C, n_heads * hd, init)
        self.wk = Linear(C, n_kv_heads * hd, init)
        self.wv = Linear(C, n_kv_heads * hd, init)
        self.wo = Linear(n_heads * hd, C, init)
        self.heads_out = nn.Identity()  # (B, T, h*hd) per-head outputs before wo: a hook point (reorder.py)

    def forward(
        self,
        x: torch.Tensor,
        heads: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer_idx: int,
        at: int | torch.Tensor,
        mask: torch.Tensor | None,
        bits: int | None = None,
    ) -> torch.Tensor:
        """`at`: where the tokens go in the cache (KVCache.update); `mask` None: plain causal attention."""
        B, T, C = x.shape
        hd = self.hd
        q = apply_rope(self.wq(x, heads * hd, bits).view(B, T, heads, hd).transpose(1, 2), cos, sin)
        k, v = self.keys_values(x, heads, cos, sin, bits)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v, at)
        gqa = self.group > 1  # == (kv != heads), but a module int: static under torch.compile
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = self.heads_out(y.transpose(1, 2).reshape(B, T, heads * hd))
        return self.wo(y, C, bits)

    def keys_values(
        self, x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, bits: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Roped keys and values (B, kv, T, hd) of normed inputs x (B, T, C): the part of forward a cache holds."""
        B, T, _ = x.shape
        hd, kv = self.hd, nested.kv_heads(heads, self.group)
        k = self.wk(x, kv * hd, bits).view(B, T, kv, hd).transpose(1, 2)
        v = self.wv(x, kv * hd, bits).view(B, T, kv, hd).transpose(1, 2)
        return apply_rope(k, cos, sin), v


class FeedForward(nn.Module):
    """SwiGLU; MatFormer nests the hidden units: a size keeps the first `ffn` of them."""

    def __init__(self, dim: int, hidden: int, init: bool = True):
        super().__init__()
        self.w_gate = Linear(dim, hidden, init)
        self.w_up = Linear(dim, hidden, init)
        self.w_down = Linear(hidden, dim, init)
        self.hidden = nn.Identity()  # (B, T, ffn) activations before w_down: a hook point (reorder.py)

    def forward(self, x: torch.Tensor, ffn: int, bits: int | None = None) -> torch.Tensor:
        a = self.hidden(F.silu(self.w_gate(x, ffn, bits)) * self.w_up(x, ffn, bits))
        return self.w_down(a, x.shape[-1], bits)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, init: bool = True):
        super().__init__()
        self.idx = i
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, cfg.layer_heads[i], cfg.layer_kv_heads[i], init)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.layer_ffn[i], init)

    def forward(
        self,
        x: torch.Tensor,
        layer: LayerSpec,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        at: int | torch.Tensor,
        mask: torch.Tensor | None,
        bits: int | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), layer.heads, cos, sin, cache, self.idx, at, mask, bits)
        return x + self.ffn(self.ffn_norm(x), layer.ffn, bits)


class MatryoshkaLM(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RopeTables | None = None, init: bool = True):
        """`rope`: RoPE cos/sin tables to share instead of computing them; `init=False` leaves the weights
        uninitialised (for weights assigned afterwards, e.g. on the meta device then load_state_dict(assign=True))."""
        super().__init__()
        self.cfg = cfg
        self.tok_emb = Embedding(cfg.vocab_size, cfg.d_model, init)
        self.layers = nn.ModuleList(Block(cfg, i, init) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, init)
        cos, sin = rope if rope is not None else rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.full = full_spec(cfg)
        self.precision = Precision()  # how the weights are held and where cells with a bit width read them
        if init:
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

    def cell_bits(self, bits: int | None) -> int | None:
        """The bit width a forward computes at (None: the loaded precision), with its planes ready."""
        if bits is not None and bits != self.precision.native_bits:
            precision.check_bits(self, bits)
        bits = self.precision.native_bits if bits is None else bits
        if bits is not None:
            precision.ensure_planes(self)
        return bits

    def embed(self, idx: torch.Tensor, spec: SubmodelSpec | None = None) -> torch.Tensor:
        """The token embeddings (B, T, C_spec) the submodel `spec` starts from (its bits' rows when quantized)."""
        spec = spec or self.full
        bits = self.cell_bits(spec.bits)
        if bits is not None and self.tok_emb.planes is not None:
            return self.tok_emb.planes.rows(idx, spec.width, bits)
        return nested.embed(idx, self.tok_emb.weight, spec.width)

    def hidden_states(
        self,
        idx: torch.Tensor | None,
        spec: SubmodelSpec | None = None,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
        *,
        h: torch.Tensor | None = None,
        first_layer: int = 0,
        norm: bool = True,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, C_spec) of the submodel `spec` (default: the full model).

        With a `cache`, the tokens go to cache slots start..start+T and attend to the slots up to their own.
        `start` an int: attention reads just those slots (eager decoding; 0 is a prefill). A tensor of one
        element: it reads all the cache's slots through a mask, so no shape depends on the position, which is
        data, not code (compiled decoding: one graph serves every step).
        Early exit (self-speculation): `norm=False` returns the residual stream after the spec's last layer, before
        the final norm; `h` (B, T, C) with `first_layer` k resumes from such a state at layer k (idx unused).
        """
        spec = spec or self.full
        bits = self.cell_bits(spec.bits)
        B, T = (idx if h is None else h).shape[:2]
        static = isinstance(start, torch.Tensor)
        if not static and start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        x = h if h is not None else self.embed(idx, spec)
        cos, sin, at, mask = self.positions(cache, start, T, x.device, x.dtype)
        for block, layer in nested.layers_from(self.layers, spec, first_layer):
            x = block(x, layer, cos, sin, cache, at, mask, bits)
        return self.norm(x) if norm else x

    def positions(self, cache: KVCache | None, start: int | torch.Tensor, T: int, device, dtype) -> tuple:
        """(cos, sin, cache slots `at`, additive mask or None) of T tokens from `start` (see hidden_states)."""
        static = isinstance(start, torch.Tensor)
        pad = None if cache is None else cache.pad
        if not static and pad is None:  # one sequence at start..: slices; a mask only for a chunk after a prefix
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
            plain = cache is None or start == 0 or T == 1
            mask = None if plain else attention_layout(start + torch.arange(T, device=device), start + T, None)[1]
            at: int | torch.Tensor = start
        else:
            slots = start + torch.arange(T, device=device)
            pos, mask = attention_layout(slots, cache.length if static else start + T, pad)
            cos, sin = self.rope_at(pos)
            at = slots if static else start
        if mask is not None:  # additive, once per forward: SDPA would convert a boolean mask in every layer
            mask = torch.where(mask, 0.0, float("-inf")).to(dtype)
        return cos, sin, at, mask

    def fill_cache(
        self, h: torch.Tensor, spec: SubmodelSpec, first_layer: int, cache: KVCache, start: int | torch.Tensor
    ) -> None:
        """Keys and values of the spec's layers from `first_layer` on for tokens whose residual stream stopped at h
        (B, T, C) (an early exit), computed from h itself and nothing else of those layers: CALM's state
        propagation, so later tokens attend to these ones at every layer. The same projections a block runs."""
        bits = self.cell_bits(spec.bits)
        cos, sin, at, _ = self.positions(cache, start, h.shape[1], h.device, h.dtype)
        for block, layer in nested.layers_from(self.layers, spec, first_layer):
            k, v = block.attn.keys_values(block.attn_norm(h), layer.heads, cos, sin, bits)
            cache.update(block.idx, k, v, at)

    def logits(self, h: torch.Tensor, bits: int | None = None) -> torch.Tensor:
        """The LM head on final-normed hidden states (B, T, C) of any width, at `bits` (None: the loaded
        precision) when the head is quantized."""
        head = self.tok_emb if self.lm_head is None else self.lm_head
        bits = self.cell_bits(bits)
        if bits is not None and head.planes is not None:
            return head.planes.linear(h, self.cfg.vocab_size, bits)
        return nested.lm_head(h, self.head_weight())

    def rope_at(self, pos: torch.Tensor) -> RopeTables:
        """cos/sin at positions (T,) -> (T, hd), or per row (B, T) -> (B, 1, T, hd) (broadcast over heads)."""
        if pos.dim() == 1:
            return self.rope_cos[pos], self.rope_sin[pos]
        return self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)

    def forward(
        self,
        idx: torch.Tensor,
        spec: SubmodelSpec | None = None,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Logits (B, T, V) of the submodel `spec` (at its bit width when it names one); `cache`/`start` for
        incremental decoding (see hidden_states)."""
        return self.logits(self.hidden_states(idx, spec, cache, start), None if spec is None else spec.bits)


def attention_layout(slots: torch.Tensor, n_keys: int, pad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE positions and attention mask (True = attend) of tokens at cache `slots` (T,) reading slots 0..n_keys:
    each attends to the slots up to its own and, with padding, to none of its row's pad slots (a pad query, in a
    prefill, to itself only: never a row of -inf, hence no NaN). (T,) and (T, n_keys); with padding, per row:
    (B, T) and (B, 1, T, n_keys)."""
    keys = torch.arange(n_keys, device=slots.device)
    causal = keys[None, :] <= slots[:, None]
    if pad is None:
        return slots, causal
    real = (keys[None, :] >= pad[:, None])[:, None, :] | (keys[None, :] == slots[:, None])  # (B, T, n_keys)
    return (slots[None] - pad[:, None]).clamp(min=0), (causal & real).unsqueeze(1)
