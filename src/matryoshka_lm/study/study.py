"""The study: one Matryoshka model vs independently trained models of each size, nesting-axis ablation, scaling fits.

`run_study` trains every run of a preset (skipping runs already complete in the work dir, so an interrupted study
continues), evaluates them on the same held-out tokens and writes report/README.md, results.json and PNG plots.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matryoshka_lm.config import ModelConfig, TrainConfig
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.spec import SubmodelSpec, count_params, flops_per_token, format_spec, parse_spec, uniform_spec
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.machine import describe_machine
from matryoshka_lm.train.eval_checkpoint import checkpoint_val_split
from matryoshka_lm.train.evaluate import evaluate_specs
from matryoshka_lm.train.loop import train

from .report import SIZES, write_report

log = logging.getLogger(__name__)
ABLATIONS = {"ffn": ("ffn",), "ffn+heads": ("ffn", "heads"), "all": ("width", "heads", "ffn", "depth")}


@dataclass
class StudyPreset:
    scales: list[int]  # full-model residual widths, smallest first
    main_scale: int  # the scale where the ablation and Mix'n'Match run
    n_layers: int = 4
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    vocab_size: int = 1024
    corpus_chars: int = 1_000_000
    eval_batches: int = 16
    mixnmatch: int = 8  # Mix'n'Match specs evaluated (never trained)


STUDY_PRESETS = {
    # seconds; for tests
    "micro": StudyPreset(
        scales=[32, 48],
        main_scale=48,
        steps=6,
        batch_size=4,
        seq_len=32,
        vocab_size=256,
        corpus_chars=60_000,
        eval_batches=2,
        mixnmatch=3,
    ),
    # <= 30 minutes on 2 CPU cores
    "cpu-small": StudyPreset(scales=[64, 96, 128, 192], main_scale=128, steps=300),
    # for a GPU
    "gpu-medium": StudyPreset(
        scales=[128, 256, 384, 512],
        main_scale=256,
        n_layers=8,
        steps=3000,
        batch_size=64,
        seq_len=256,
        lr=1.5e-3,
        vocab_size=8192,
        corpus_chars=0,
        eval_batches=64,
        mixnmatch=16,
    ),
}


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


def preset_train_config(p: Any, seed: int, only: str | None = None) -> TrainConfig:
    """The training settings every run of a study preset shares (StudyPreset or recipes.RecipePreset)."""
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


def plan_runs(p: StudyPreset, seed: int) -> dict[str, tuple[ModelConfig, TrainConfig]]:
    """Every run of the study: name -> (model config, train config). Same data, tokens, hyper-parameters."""

    def tcfg(only: str | None = None) -> TrainConfig:
        return preset_train_config(p, seed, only)

    def mcfg(d: int, axes: tuple[str, ...] = ABLATIONS["all"]) -> ModelConfig:
        return scale_config(d, p.n_layers, p.vocab_size, p.seq_len, axes)

    runs = {}
    for d in p.scales:
        runs[f"d{d}-matryoshka-all"] = (mcfg(d), tcfg())
        for s in SIZES:
            runs[f"d{d}-baseline-{s}"] = (mcfg(d), tcfg(only=s))
        if d == p.main_scale:
            for name, axes in ABLATIONS.items():
                if name != "all":
                    runs[f"d{d}-matryoshka-{name}"] = (mcfg(d, axes), tcfg())
    return runs


def _complete(out: Path, steps: int) -> bool:
    if not (out / ck.STATE).is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(out / ck.STATE), "pt") as f:
        return int((f.metadata() or {}).get("step", -1)) >= steps


def train_all(
    runs: dict[str, tuple[ModelConfig, TrainConfig]],
    work: Path,
    data: str | None,
    device: str,
    on_run: Callable[[str, str], None] | None = None,
    jobs: int = 1,
) -> dict[str, float]:
    """Train each run unless complete; returns wall seconds per trained run. jobs > 1 trains that many runs at
    once in worker processes (one torch thread each: on a small CPU, runs in parallel beat threads in one run)."""
    seconds, todo = {}, {}
    for name, (mcfg, tcfg) in runs.items():
        if _complete(work / name, tcfg.steps):
            on_run and on_run(name, "cached")
            seconds[name] = _logged_seconds(work / name, tcfg)
        else:
            todo[name] = (mcfg, tcfg)
    if jobs <= 1 or len(todo) <= 1:
        for name, (mcfg, tcfg) in todo.items():
            on_run and on_run(name, "training")
            seconds[name] = train_one(mcfg, tcfg, work / name, data, device)
        return seconds
    from concurrent.futures import as_completed

    with process_pool(jobs) as pool:
        futures = {pool.submit(train_one, m, t, work / n, data, device): n for n, (m, t) in todo.items()}
        for n in todo:
            on_run and on_run(n, "queued")
        for f in as_completed(futures):
            seconds[futures[f]] = f.result()
            on_run and on_run(futures[f], f"trained in {seconds[futures[f]] / 60:.1f} min")
    return seconds


def process_pool(jobs: int) -> Any:
    """`jobs` worker processes (spawned: no fork of a process that holds torch threads), one torch thread each."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_one_thread)


def _one_thread() -> None:
    torch.set_num_threads(1)


def train_one(mcfg: ModelConfig, tcfg: TrainConfig, out: Path, data: str | None, device: str) -> float:
    """Train one run, continuing it if it was interrupted with state saved; returns its wall seconds."""
    resume = (out / ck.STATE).is_file()
    if out.exists() and not resume:  # interrupted before its first checkpoint: start over
        import shutil

        shutil.rmtree(out)
    t0 = time.perf_counter()
    train(mcfg, tcfg, out, data=data, resume=resume, device=device)
    return time.perf_counter() - t0


def _logged_seconds(out: Path, tcfg: TrainConfig) -> float:
    """Training time of a finished run, from the throughput its last logged step reports."""
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return tcfg.steps * tcfg.batch_size * tcfg.seq_len / last["tokens_per_s"]


def mixnmatch_specs(cfg: ModelConfig, n: int, seed: int) -> list[SubmodelSpec]:
    """Per-layer mixes of the trained granularities, non-decreasing with depth (MatFormer's best family)."""
    rng = random.Random(seed)
    order = SIZES[::-1]  # S < M < L < XL
    seen, out = set(), []
    for _ in range(50 * n):
        picks = sorted(rng.choices(range(len(order)), k=cfg.n_layers))
        if len(set(picks)) < 2:
            continue
        text = ",".join(order[i] for i in picks)
        if text not in seen:
            seen.add(text)
            out.append(parse_spec(cfg, text))
        if len(out) == n:
            break
    return out


def fit_scaling(n: np.ndarray, loss: np.ndarray) -> dict[str, float]:
    """Least-squares fit of L(N) = a * N^(-b) + c with 1-sigma uncertainties from the covariance (scipy)."""
    from scipy.optimize import curve_fit

    n, loss = np.asarray(n, float), np.asarray(loss, float)
    if len(n) < 4:
        raise MatryoshkaError(f"need at least 4 points to fit 3 constants, got {len(n)}")
    scale = float(n.min())

    def f(x, a, b, c):  # N scaled by its minimum keeps a in a sane range
        return a * (x / scale) ** (-b) + c

    p0 = (max(1e-3, float(loss.max() - loss.min())), 0.5, float(loss.min()) * 0.9)
    popt, pcov = curve_fit(f, n, loss, p0=p0, bounds=([0, 0, 0], [np.inf, 5, np.inf]), maxfev=20000)
    err = np.sqrt(np.clip(np.diag(pcov), 0, None))
    a = popt[0] * scale ** popt[1]  # back to L = a N^-b + c
    a_err = err[0] * scale ** popt[1]
    resid = loss - f(n, *popt)
    return {
        "a": float(a),
        "b": float(popt[1]),
        "c": float(popt[2]),
        "a_err": float(a_err),
        "b_err": float(err[1]),
        "c_err": float(err[2]),
        "rmse": float(np.sqrt(np.mean(resid**2))),
    }


def evaluate_study(
    runs: dict[str, tuple[ModelConfig, TrainConfig]], p: StudyPreset, work: Path, seed: int, device: str
) -> dict[str, Any]:
    first = next(iter(runs))
    _, _, val = checkpoint_val_split(work / first)
    tok0 = (work / first / ck.TOKENIZER).read_text()
    res: dict[str, Any] = {"matryoshka": {}, "baseline": {}, "ablation": {}, "mixnmatch": {}, "consistency": {}}
    models = {}
    for name in runs:
        if (work / name / ck.TOKENIZER).read_text() != tok0:
            raise MatryoshkaError(f"run {name} has a different tokenizer: the runs are not comparable")
        models[name] = ck.load_model(work / name, device)
    ev = lambda m, specs, ref=None: evaluate_specs(m, val, specs, p.seq_len, 8, p.eval_batches, device, ref)
    for d in p.scales:
        mat = models[f"d{d}-matryoshka-all"]
        specs = {s: uniform_spec(mat.cfg, s) for s in SIZES}
        r = ev(mat, specs)
        res["matryoshka"][d] = {s: _point(mat.cfg, specs[s], r[s]) for s in SIZES}
        base_full = models[f"d{d}-baseline-XL"]
        res["baseline"][d] = {}
        for s in SIZES:  # a baseline's agreement and KL are against the independently trained XL
            b = models[f"d{d}-baseline-{s}"]
            rb = ev(b, {s: b.full}, (base_full, base_full.full))[s]
            res["baseline"][d][s] = {**_point(b.cfg, b.full, rb), "top1_agreement": rb["agree"]}
        if d == p.main_scale:
            for name in ABLATIONS:
                m = models[f"d{d}-matryoshka-{name}"]
                sp = {s: uniform_spec(m.cfg, s) for s in SIZES}
                ra = ev(m, sp)
                res["ablation"][name] = {s: _point(m.cfg, sp[s], ra[s]) for s in SIZES}
                # Mix'n'Match on every design: mixing per-layer granularities is MatFormer's setting (FFN), and
                # with width and depth nested a mix also combines widths and layers never trained together
                mix = mixnmatch_specs(m.cfg, p.mixnmatch, seed)
                rm = ev(m, {format_spec(s): s for s in mix})
                res["mixnmatch"][name] = [{"spec": format_spec(s), **_point(m.cfg, s, rm[format_spec(s)])} for s in mix]
    for d in p.scales:  # Matryoshka consistency is the agree/KL columns of its own eval
        for s in SIZES:
            m = res["matryoshka"][d][s]
            res["consistency"].setdefault(d, {})[s] = {
                "matryoshka": {"top1_agreement": m["agree"], "kl": m["kl"]},
                "baseline": {k: res["baseline"][d][s][k] for k in ("top1_agreement", "kl")},
            }
    pts = lambda kind: [(v["non_embedding_params"], v["val_loss"]) for d in p.scales for v in res[kind][d].values()]
    res["fits"] = {}
    for kind in ("matryoshka", "baseline"):
        n, l = zip(*pts(kind))
        try:
            res["fits"][kind] = fit_scaling(np.array(n), np.array(l))
        except (RuntimeError, MatryoshkaError) as e:  # curve_fit gives up on degenerate points
            res["fits"][kind] = {"error": str(e)}
    return res


def _point(cfg: ModelConfig, spec: SubmodelSpec, r: dict[str, float]) -> dict[str, float]:
    p = count_params(cfg, spec)
    return {
        "non_embedding_params": p["non_embedding"],
        "params": p["total"],
        "flops_per_token": flops_per_token(cfg, spec),
        "val_loss": r["loss"],
        "agree": r["agree"],
        "kl": r["kl"],
    }


def run_study(
    preset_name: str,
    report: str | Path,
    work: str | Path | None = None,
    data: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    on_run: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Train (or reuse) every run of the preset, evaluate, and write the report folder. Returns the results."""
    if preset_name not in STUDY_PRESETS:
        raise MatryoshkaError(f"unknown study preset {preset_name!r}; choose from {list(STUDY_PRESETS)}")
    p = STUDY_PRESETS[preset_name]
    report = Path(report)
    work = Path(work) if work else Path("runs") / f"study-{preset_name}"
    runs = plan_runs(p, seed)
    t0 = time.perf_counter()
    seconds = train_all(runs, work, data, device, on_run)
    res = evaluate_study(runs, p, work, seed, device)
    res["meta"] = {
        "preset": preset_name,
        "settings": p.__dict__,
        "seed": seed,
        "data": data or "default corpus",
        "tokens_per_run": p.steps * p.batch_size * p.seq_len,
        "machine": describe_machine(device),
        "train_seconds": seconds,
        "wall_seconds": time.perf_counter() - t0,
        "train_seconds_total": sum(seconds.values()),
        "torch": torch.__version__,
        "command": f"matryoshka study --preset {preset_name} -o {report} --seed {seed}",
    }
    write_report(res, p, report)
    return res
