"""Model and training configuration: plain dataclasses, JSON round-trip, presets. Stdlib only."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from matryoshka_lm.errors import MatryoshkaError

AXES = ("width", "heads", "ffn", "depth")
SAMPLINGS = ("all", "sandwich", "mix")  # TrainConfig.sampling

# Default granularities (G=4). MatFormer nests the FFN with fractions 1, 1/2, 1/4, 1/8. When every axis is
# nested we shrink a mix of axes rather than all at once, so that the non-embedding parameters fall roughly
# as 1x, 1/2x, 1/4x, 1/8x (for an FFN of ~8/3 d_model and GQA groups of 2: 1.00, 0.50, 0.24, 0.13).
# Axes switched off in the config are held at 1 whatever these say.
DEFAULT_SIZES: dict[str, dict[str, str]] = {
    "XL": {"width": "1", "heads": "1", "ffn": "1", "depth": "1"},
    "L": {"width": "1", "heads": "1/2", "ffn": "1/2", "depth": "1"},
    "M": {"width": "3/4", "heads": "1/2", "ffn": "1/4", "depth": "1"},
    "S": {"width": "3/4", "heads": "1/2", "ffn": "1/8", "depth": "3/4"},
}


def _per_layer(value: int | list[int], n_layers: int, name: str) -> list[int]:
    """Broadcast a scalar to one value per layer (the Gemma 3n convention); check list lengths."""
    if isinstance(value, int):
        return [value] * n_layers
    values = [int(v) for v in value]
    if len(values) != n_layers:
        raise MatryoshkaError(f"{name} has {len(values)} entries but the model has {n_layers} layers")
    return values


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    d_model: int = 192  # residual width C
    n_layers: int = 4
    n_heads: int | list[int] = 8  # query heads, scalar or one per layer
    n_kv_heads: int | list[int] = 4  # key/value heads (GQA); n_heads / n_kv_heads is the group size
    head_dim: int = 0  # 0 -> d_model // n_heads; fixed when the residual width is sliced
    ffn_dim: int | list[int] = 512  # SwiGLU hidden width, scalar or one per layer
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # which axes are nested (trained as prefixes); a switched-off axis is always taken whole
    nest_width: bool = True
    nest_heads: bool = True
    nest_ffn: bool = True
    nest_depth: bool = True
    sizes: dict[str, dict[str, str]] = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_SIZES)))

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise MatryoshkaError(f"{name} must be positive, got {getattr(self, name)}")
        heads = self.layer_heads
        kv = self.layer_kv_heads
        for i, (h, k) in enumerate(zip(heads, kv)):
            if h <= 0 or k <= 0 or h % k:
                raise MatryoshkaError(f"layer {i}: n_heads={h} must be a positive multiple of n_kv_heads={k}")
        if len({h // k for h, k in zip(heads, kv)}) != 1:
            raise MatryoshkaError("the GQA group size n_heads / n_kv_heads must be the same in every layer")
        if self.head_dim <= 0:
            if self.d_model % max(heads):
                raise MatryoshkaError(f"d_model={self.d_model} is not divisible by n_heads={max(heads)}; set head_dim")
            self.head_dim = self.d_model // max(heads)
        if self.head_dim % 2:
            raise MatryoshkaError(f"head_dim must be even for RoPE, got {self.head_dim}")
        _per_layer(self.ffn_dim, self.n_layers, "ffn_dim")
        if not self.sizes:
            raise MatryoshkaError("the config names no sizes")
        for size, fracs in self.sizes.items():
            unknown = set(fracs) - set(AXES)
            if unknown:
                raise MatryoshkaError(f"size {size!r} names unknown axes {sorted(unknown)}; axes are {list(AXES)}")

    # per-layer views: a standalone (extracted) model may have a different width in every layer
    @property
    def layer_heads(self) -> list[int]:
        return _per_layer(self.n_heads, self.n_layers, "n_heads")

    @property
    def layer_kv_heads(self) -> list[int]:
        return _per_layer(self.n_kv_heads, self.n_layers, "n_kv_heads")

    @property
    def layer_ffn(self) -> list[int]:
        return _per_layer(self.ffn_dim, self.n_layers, "ffn_dim")

    @property
    def group_size(self) -> int:
        return self.layer_heads[0] // self.layer_kv_heads[0]

    def nested(self, axis: str) -> bool:
        return bool(getattr(self, f"nest_{axis}"))

    def fraction(self, size: str, axis: str) -> Fraction:
        """The fraction of `axis` kept by the named size (1 when the axis is not nested)."""
        if size not in self.sizes:
            raise MatryoshkaError(f"unknown size {size!r}; this model has sizes {list(self.sizes)}")
        if not self.nested(axis):
            return Fraction(1)
        raw = self.sizes[size].get(axis, "1")
        try:
            frac = Fraction(str(raw))
        except (ValueError, ZeroDivisionError):
            raise MatryoshkaError(f"size {size!r}: {axis} fraction {raw!r} is not a number like 1/2") from None
        if not 0 < frac <= 1:
            raise MatryoshkaError(f"size {size!r}: {axis} fraction {raw} must be in (0, 1]")
        return frac

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise MatryoshkaError(f"unknown model config keys {sorted(unknown)}")
        return cls(**d)


PREPARE_TEXT = ("auto", "always", "never")  # which text --data goes through the shard cache (data/cache.py)


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # sequences per optimizer step (global, across ranks and accumulation)
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    sizes: list[str] | None = None  # granularities trained jointly; None -> every size in the model config
    size_weights: list[float] | None = None  # loss weight per trained size; None -> all 1
    sample_sizes: int = 0  # >0: train a random subset of this many sizes per step (the full size always)
    distill: float = 0.0  # weight of KL(full || size) self-distillation for the smaller sizes
    # a checkpoint whose full model is a frozen teacher: with distill > 0 every size (the full one too) learns
    # KL(teacher || size) instead of KL(full || size) (distilling a pretrained model into an elastic one)
    teacher: str | None = None
    # what each step trains: "all" trained sizes (MatFormer); "sandwich": the full and the smallest size plus
    # `mixes` random Mix'n'Match specs; "mix": `mixes` random Mix'n'Match specs only (train/mixes.py)
    sampling: str = "all"
    mixes: int = 2
    only: str | None = None  # baseline mode: train one dense model of this size's shape
    # Matryoshka Quantization (core/quant.py): quantization-aware training of these bit widths jointly (every
    # size at every width, the top bits of one set of int8 codes; straight-through estimator); None = off
    bits: list[int] | None = None
    bit_weights: list[float] | None = None  # loss weight per bit width; None -> all 1
    quant_group: int = 32  # input features per quantization scale (0 = one scale per output row)
    sample_cells: int = 0  # with bits: >0 trains this many (size, bits) cells per step (always the widest pair)
    dtype: str = "auto"  # auto -> bf16 autocast where supported (CUDA), else fp32
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    vocab_size: int = 2048  # BPE vocabulary trained on the corpus
    max_corpus_chars: int = 0  # 0 -> whole corpus
    val_fraction: float = 0.05
    fsdp: bool = False
    checkpointing: bool = False  # recompute each block's activations in the backward (memory for ~1/3 more compute)
    compile: bool = False  # torch.compile every transformer block (one graph per size's shape)
    fused_adamw: str = "auto"  # "on" / "off"; auto: on CUDA
    data: str | None = None  # text file or folder; None -> the embedded default corpus
    prepare_text: str = "auto"  # text through the token-shard cache (data/cache.py): one of PREPARE_TEXT

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "save_every", "eval_every"):
            if getattr(self, name) <= 0:
                raise MatryoshkaError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise MatryoshkaError(f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")
        if not 0 < self.val_fraction < 1:
            raise MatryoshkaError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.prepare_text not in PREPARE_TEXT:
            raise MatryoshkaError(f"prepare_text must be one of {', '.join(PREPARE_TEXT)}, got {self.prepare_text!r}")
        if self.distill < 0:
            raise MatryoshkaError(f"distill must be >= 0, got {self.distill}")
        if self.teacher is not None and self.distill <= 0:
            raise MatryoshkaError("a teacher is used through distillation: give distill > 0 (e.g. --distill 1)")
        if self.sampling not in SAMPLINGS:
            raise MatryoshkaError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")
        if self.mixes < 1:
            raise MatryoshkaError(f"mixes must be >= 1, got {self.mixes}")
        if self.sampling != "all" and self.bits:
            raise MatryoshkaError("sampled Mix'n'Match specs (sampling sandwich or mix) do not combine with --bits yet")
        if self.bits is not None:
            bad = [b for b in self.bits if not 2 <= int(b) <= 8]
            if bad or not self.bits or len(set(self.bits)) != len(self.bits):
                raise MatryoshkaError(f"bits must be distinct widths in 2..8 (the top bits of int8), got {self.bits}")
            if self.bit_weights is not None and len(self.bit_weights) != len(self.bits):
                raise MatryoshkaError(f"{len(self.bit_weights)} bit weights for bits {self.bits}")
            if self.fsdp:
                raise MatryoshkaError("quantization-aware training (bits) runs with DDP or on one process, not FSDP")
        if self.fused_adamw not in ("auto", "on", "off"):
            raise MatryoshkaError(f"fused_adamw must be auto, on or off, got {self.fused_adamw!r}")
        if self.quant_group < 0:
            raise MatryoshkaError(f"quant_group must be >= 0 (0 = one scale per output row), got {self.quant_group}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Presets: (model, train) overrides. `tiny` is for tests (well under a minute on 2 cores); `demo` for `make demo`.
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "tiny": (
        dict(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64, vocab_size=512),
        dict(
            steps=40,
            batch_size=8,
            seq_len=64,
            lr=3e-3,
            warmup_steps=5,
            eval_every=20,
            save_every=20,
            eval_batches=4,
            vocab_size=512,
            max_corpus_chars=400_000,
        ),
    ),
    "demo": (
        dict(d_model=192, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=512, max_seq_len=256, vocab_size=2048),
        dict(
            steps=400,
            batch_size=16,
            seq_len=128,
            lr=3e-3,
            warmup_steps=40,
            eval_every=100,
            save_every=100,
            eval_batches=16,
            vocab_size=2048,
            max_corpus_chars=3_000_000,
        ),
    ),
    # batch-1 decode memory-bound on a CPU (118 MB of fp32 weights, past the caches), for speculative decoding:
    # early exits at half and a quarter of the depth (drafts that reuse the target's work) and a width-nested size
    "memory": (
        dict(
            d_model=512,
            n_layers=8,
            n_heads=8,
            n_kv_heads=4,
            ffn_dim=1536,
            max_seq_len=256,
            vocab_size=4096,
            nest_width=False,
            sizes={
                "XL": {"depth": "1"},
                "E4": {"depth": "1/2"},
                "E2": {"depth": "1/4"},
                "W": {"heads": "1/2", "ffn": "1/4"},
            },
        ),
        dict(
            steps=300,
            batch_size=8,
            seq_len=128,
            lr=2e-3,
            warmup_steps=20,
            eval_every=100,
            save_every=50,
            eval_batches=8,
            vocab_size=4096,
            max_corpus_chars=3_000_000,
        ),
    ),
    "small": (
        dict(d_model=384, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1024, max_seq_len=512, vocab_size=8192),
        dict(
            steps=3000,
            batch_size=32,
            seq_len=256,
            lr=1.5e-3,
            warmup_steps=200,
            eval_every=250,
            save_every=250,
            eval_batches=32,
            vocab_size=8192,
        ),
    ),
}


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    if name not in PRESETS:
        raise MatryoshkaError(f"unknown preset {name!r}; choose from {list(PRESETS)}")
    m, t = PRESETS[name]
    return ModelConfig(**m), TrainConfig(**t)


def load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MatryoshkaError(f"missing file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MatryoshkaError(f"corrupt JSON in {path}: {e}") from None
