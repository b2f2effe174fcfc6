"""Settings of `matryoshka elastify` (recipe.py): the presets, the prompts its samples continue, and the
names its stages and results share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STAGES = ("prepare", "train", "eval", "speed", "generate", "student", "ship", "report")
MODELS = ("original", "reordered", "elastic")  # naive slices, reordered slices before training, after

# plain-text openings: the teacher (an instruct model) continues each with a sensible English sentence
PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a little girl who",
    "The three primary colors are",
    "To make a cup of tea, first",
    "Water boils at a temperature of",
    "In the beginning God created",
)


# ~20 M parameters (12.6 M of them the 49k-token embedding): ~21 MB as int8 codes
STUDENT = dict(d_model=256, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=1024, max_seq_len=512)

# openings the teacher continues (sampled) to make the student's generated training text
GEN_OPENINGS = (
    "The", "Once upon a time", "In the", "Here is", "Scientists", "My favorite", "The history of", "How to",
    "Yesterday", "Dear", "Question:", "A good", "When I was", "The best way to", "It was", "Today", "Why do",
)  # fmt: skip


@dataclass
class ElastifyPreset:
    """Settings of one elastify run; `gpu` is the realistic one, `tiny` keeps CI's test of the recipe short."""

    nest: tuple[str, ...] = ("heads", "ffn")
    exit_fraction: float = 0.25  # an early-exit size of this share of the layers, trained as a draft (0: none)
    train_minutes: float = 15.0  # wall-clock budget of the distillation, over every call
    batch_size: int = 32
    seq_len: int = 512
    grad_accum: int = 2  # micro-batches per step: four sizes' 49k-vocabulary logits and their KL take memory
    lr: float = 3e-4
    warmup_fraction: float = 0.05
    distill: float = 1.0
    sample_sizes: int = 0  # 0: all sizes every step
    max_corpus_chars: int = 0  # 0: the whole default corpus
    eval_batches: int = 32  # of 8 sequences of seq_len
    save_minutes: float = 2.0  # checkpoint cadence, so a lost machine costs at most this much training
    reorder_batches: int = 16
    reorder_seq_len: int = 256
    prompts: tuple[str, ...] = PROMPTS
    sample_tokens: int = 40
    speed_tokens: int = 128  # generated per timed run (batch 1, after a short prompt)
    speed_repeats: int = 3
    gamma: int = 4  # speculative draft tokens per round
    hf_generate: bool = True  # time transformers.generate on the same weights
    dtype: str = "auto"  # training autocast; "auto" = bf16 on CUDA
    plan_steps: int = 4  # timed steps (the first two are warm-up) that size the run
    steps: int | None = None  # fixed instead of sized to train_minutes (e.g. on 8 GPUs, planned on one)
    # the small elastic student to ship (student.py): a fresh model with the teacher's tokenizer,
    # distilled from it on its own generations plus the corpus, stored as int8 codes under ship_mb
    student: dict[str, Any] = field(default_factory=lambda: dict(STUDENT))
    student_minutes: float = 8.0
    student_batch_size: int = 64
    student_seq_len: int = 256
    student_lr: float = 2e-3
    gen_minutes: float = 3.0  # teacher generations: wall-clock budget ...
    gen_tokens: int = 4_000_000  # ... and token target, whichever comes first
    gen_batch: int = 64
    gen_length: int = 256
    ship_mb: float = 32.0
    ship_group: int = 32  # input features per int8 scale (every nested width must divide by it)


PRESETS = {
    # 10 + 5 + 2 minutes of training and generation: with the CUDA tests, evaluation, timing and a machine start,
    # one session's 30 minutes of GPU time (docs/gpu-recipe.md)
    "gpu": ElastifyPreset(train_minutes=10.0, student_minutes=5.0, gen_minutes=2.0),
    "cpu": ElastifyPreset(
        train_minutes=20.0, batch_size=8, seq_len=128, sample_sizes=2, max_corpus_chars=2_000_000, eval_batches=4,
        reorder_batches=8, reorder_seq_len=128, speed_tokens=32, speed_repeats=1, hf_generate=True,
    ),
    "tiny": ElastifyPreset(
        train_minutes=0.05, batch_size=4, seq_len=32, lr=1e-3, max_corpus_chars=60_000, eval_batches=2,
        reorder_batches=1, reorder_seq_len=32, prompts=PROMPTS[:2], sample_tokens=8, speed_tokens=8,
        speed_repeats=1, gamma=2, save_minutes=0.01, plan_steps=3,
        student=dict(d_model=16, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=32, max_seq_len=64),
        student_minutes=0.02, student_batch_size=4, student_seq_len=32, gen_minutes=0.05, gen_tokens=400,
        gen_batch=4, gen_length=16, ship_mb=1.0, ship_group=4, grad_accum=1,
    ),
}  # fmt: skip
