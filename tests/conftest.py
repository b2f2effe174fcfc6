from __future__ import annotations

import os

# tiny models gain nothing from 2 threads, and OpenMP threads spin badly when the CPU is shared
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Inductor's on-disk cache does not key its compiled graphs on ATEN_CPU_CAPABILITY: a graph compiled for AVX-512
# and replayed under ATEN_CPU_CAPABILITY=avx2 (or the reverse) reads garbage or corrupts the heap (seen on an AMX
# Xeon with torch 2.13: NaN logits, "double free"). One cache per capability keeps each run on its own kernels.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(
        os.environ.get("TMPDIR", "/tmp"),
        f"torchinductor_{os.getuid()}_{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}",
    ),
)

import pydoc_data.topics  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from matryoshka_lm.config import ModelConfig, TrainConfig
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import LayerSpec, SubmodelSpec

torch.set_num_threads(1)


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


@st.composite
def submodel_specs(draw, cfg: ModelConfig) -> SubmodelSpec:
    """Any valid spec of `cfg`, drawn by its structure (depth, then each layer's FFN units and whole GQA groups,
    then the residual width), so that a failure shrinks to the shallowest, narrowest spec that still fails."""
    g = cfg.group_size
    depth = draw(st.integers(1, cfg.n_layers))
    layers = tuple(
        LayerSpec(ffn=draw(st.integers(1, cfg.layer_ffn[i])), heads=g * draw(st.integers(1, cfg.layer_heads[i] // g)))
        for i in range(depth)
    )
    return SubmodelSpec(width=draw(st.integers(1, cfg.d_model)), layers=layers)


@pytest.fixture
def tiny_model() -> MatryoshkaLM:
    torch.manual_seed(0)
    return MatryoshkaLM(tiny_config()).eval()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """~465K chars of Python documentation prose shipped with the stdlib: a small real corpus."""
    path = tmp_path_factory.mktemp("corpus") / "pydoc.txt"
    path.write_text("\n\n".join(pydoc_data.topics.topics.values()))
    return path


def tiny_train_config(**kw) -> TrainConfig:
    base = dict(
        steps=8,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        eval_every=1000,
        save_every=1000,
        eval_batches=2,
        vocab_size=256,
        max_corpus_chars=60_000,
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)
