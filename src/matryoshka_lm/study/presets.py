"""The one registry of study presets (`matryoshka study --preset NAME`) and the model family every study trains.

A preset's class names its study: a SizesPreset runs sizes.py (Matryoshka vs independently trained models, axis
ablation, scaling fits), a RecipePreset runs recipes.py (training recipes at equal FLOPs, in and out of domain).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from matryoshka_lm.config import DEFAULT_SIZES, ModelConfig, TrainConfig
from matryoshka_lm.errors import MatryoshkaError

SIZES = list(DEFAULT_SIZES)  # every study trains the default sizes
ABLATIONS = {"ffn": ("ffn",), "ffn+heads": ("ffn", "heads"), "all": ("width", "heads", "ffn", "depth")}

# recipe name -> TrainConfig fields; "all" is today's default and sets the recipe study's FLOPs budget
RECIPES: dict[str, dict[str, Any]] = {
    "all": {},
    "all+distill": {"distill": 1.0},
    "sandwich": {"sampling": "sandwich", "mixes": 2},
    "sandwich+distill": {"sampling": "sandwich", "mixes": 2, "distill": 1.0},
    "mix": {"sampling": "mix", "mixes": 2},
    "mix+distill": {"sampling": "mix", "mixes": 2, "distill": 1.0},
}


@dataclass(kw_only=True)
class Preset:
    """What every study's runs share: the scales, the model family's depth and vocabulary, the training settings."""

    study: ClassVar[str]  # the module in study/ that plans, evaluates and reports it
    scales: list[int]  # full-model residual widths, smallest first
    n_layers: int = 4
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    vocab_size: int = 1024
    corpus_chars: int = 1_000_000
    eval_batches: int = 16
    mixnmatch: int = 8  # Mix'n'Match specs evaluated per model (never trained)


@dataclass(kw_only=True)
class SizesPreset(Preset):
    study: ClassVar[str] = "sizes"
    main_scale: int  # the scale where the ablation and Mix'n'Match run


@dataclass(kw_only=True)
class RecipePreset(Preset):
    study: ClassVar[str] = "recipes"
    steps: int = 300  # of the "all" recipe; the others run until they have spent its FLOPs
    corpus_chars: int = 3_000_000
    mixnmatch: int = 16
    recipes: list[str] = field(default_factory=lambda: list(RECIPES))
    harness: bool = True  # lm-eval bits per byte and cloze accuracy per size at the largest scale
    harness_limit: int | None = None  # documents per task (None: all)


PRESETS: dict[str, Preset] = {
    # seconds; for tests
    "micro": SizesPreset(
        scales=[32, 48], main_scale=48, steps=6, batch_size=4, seq_len=32, vocab_size=256, corpus_chars=60_000,
        eval_batches=2, mixnmatch=3,
    ),
    # <= 30 minutes on 2 CPU cores
    "cpu-small": SizesPreset(scales=[64, 96, 128, 192], main_scale=128, steps=300),
    # for a GPU
    "gpu-medium": SizesPreset(
        scales=[128, 256, 384, 512], main_scale=256, n_layers=8, steps=3000, batch_size=64, seq_len=256, lr=1.5e-3,
        vocab_size=8192, corpus_chars=0, eval_batches=64, mixnmatch=16,
    ),
    "recipes-micro": RecipePreset(
        scales=[32, 48], steps=4, batch_size=4, seq_len=32, vocab_size=256, corpus_chars=60_000, eval_batches=2,
        mixnmatch=3, recipes=["all", "sandwich", "mix+distill"], harness_limit=3,
    ),
    # ~2 hours of this 2-core machine with --jobs 2; both scales are wider than anything in cpu-small (d <= 192)
    "cpu-recipes": RecipePreset(scales=[256, 320]),
}  # fmt: skip


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise MatryoshkaError(f"unknown study preset {name!r}; choose from {list(PRESETS)}")
    return PRESETS[name]


def scale_config(d: int, n_layers: int, vocab: int, seq_len: int, axes: tuple[str, ...]) -> ModelConfig:
    """One member of the model family: 4 query heads in GQA groups of 2, SwiGLU width ~8/3 d (multiple of 32)."""
    ffn = max(32, round(8 * d / 3 / 32) * 32)
    return ModelConfig(
        vocab_size=vocab,
        d_model=d,
        n_layers=n_layers,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=ffn,
        max_seq_len=seq_len,
        **{f"nest_{a}": a in axes for a in ("width", "heads", "ffn", "depth")},
    )


def preset_train_config(p: Preset, seed: int, only: str | None = None) -> TrainConfig:
    """The training settings every run of a preset shares (`only`: train that one size, a baseline)."""
    return TrainConfig(
        steps=p.steps,
        batch_size=p.batch_size,
        seq_len=p.seq_len,
        lr=p.lr,
        warmup_steps=max(1, p.steps // 10),
        eval_every=p.steps,
        save_every=p.steps,
        eval_batches=p.eval_batches,
        vocab_size=p.vocab_size,
        max_corpus_chars=p.corpus_chars,
        seed=seed,
        only=only,
    )
