"""The sizes study: one Matryoshka model vs independently trained models of each size, which axes to nest, and
scaling fits, per scale of a SizesPreset. Run by runner.py; its report is sizes_report.py."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.spec import format_spec, uniform_spec

from .evaluate import evaluate as ev
from .evaluate import fit_or_error, held_out, mixnmatch_specs, point
from .presets import ABLATIONS, SIZES, SizesPreset, preset_train_config, scale_config
from .runs import Runs
from .sizes_report import write_report

WORK_PREFIX = "study"  # runs/study-PRESET
__all__ = ["WORK_PREFIX", "evaluate", "meta", "plan", "write_report"]


def plan(p: SizesPreset, seed: int) -> Runs:
    """Every run of the study: name -> (model config, train config). Same data, tokens, hyper-parameters."""
    runs = {}
    for d in p.scales:
        mcfg = partial(scale_config, d, p.n_layers, p.vocab_size, p.seq_len)  # of the nested axes
        runs[f"d{d}-matryoshka-all"] = (mcfg(ABLATIONS["all"]), preset_train_config(p, seed))
        for s in SIZES:
            runs[f"d{d}-baseline-{s}"] = (mcfg(ABLATIONS["all"]), preset_train_config(p, seed, only=s))
        if d == p.main_scale:
            for name, axes in ABLATIONS.items():
                if name != "all":
                    runs[f"d{d}-matryoshka-{name}"] = (mcfg(axes), preset_train_config(p, seed))
    return runs


def meta(p: SizesPreset, jobs: int) -> dict[str, Any]:
    return {"tokens_per_run": p.steps * p.batch_size * p.seq_len}


def evaluate(runs: Runs, p: SizesPreset, work: Path, seed: int, device: str, jobs: int = 1) -> dict[str, Any]:
    """Per scale: each Matryoshka size and its baseline; at the main scale each nesting design with its
    Mix'n'Match specs; then consistency with the full size and the scaling fits."""
    val, _ = held_out(runs, work)
    res: dict[str, Any] = {"matryoshka": {}, "baseline": {}, "ablation": {}, "mixnmatch": {}, "consistency": {}}
    models = {name: ck.load_model(work / name, device) for name in runs}
    for d in p.scales:
        mat = models[f"d{d}-matryoshka-all"]
        specs = {s: uniform_spec(mat.cfg, s) for s in SIZES}
        r = ev(mat, val, specs, p, device)
        res["matryoshka"][d] = {s: point(mat.cfg, specs[s], r[s]) for s in SIZES}
        full = models[f"d{d}-baseline-XL"]
        res["baseline"][d] = {}
        for s in SIZES:  # a baseline's agreement and KL are against the independently trained XL
            b = models[f"d{d}-baseline-{s}"]
            rb = ev(b, val, {s: b.full}, p, device, (full, full.full))[s]
            res["baseline"][d][s] = {**point(b.cfg, b.full, rb), "top1_agreement": rb["agree"]}
        if d == p.main_scale:
            for name in ABLATIONS:
                res["ablation"][name], res["mixnmatch"][name] = _design(models[f"d{d}-matryoshka-{name}"], val, p,
                                                                        seed, device)  # fmt: skip
    for d in p.scales:  # Matryoshka consistency is the agree/KL columns of its own eval
        for s in SIZES:
            m = res["matryoshka"][d][s]
            res["consistency"].setdefault(d, {})[s] = {
                "matryoshka": {"top1_agreement": m["agree"], "kl": m["kl"]},
                "baseline": {k: res["baseline"][d][s][k] for k in ("top1_agreement", "kl")},
            }
    res["fits"] = {}
    for kind in ("matryoshka", "baseline"):
        pts = [(v["non_embedding_params"], v["val_loss"]) for d in p.scales for v in res[kind][d].values()]
        res["fits"][kind] = fit_or_error(*zip(*pts))
    return res


def _design(m, val, p: SizesPreset, seed: int, device: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One nesting design's trained sizes and its Mix'n'Match specs. Mix'n'Match runs on every design: mixing
    per-layer granularities is MatFormer's setting (FFN), and with width and depth nested a mix also combines
    widths and layers never trained together."""
    sp = {s: uniform_spec(m.cfg, s) for s in SIZES}
    ra = ev(m, val, sp, p, device)
    mix = mixnmatch_specs(m.cfg, p.mixnmatch, seed)
    rm = ev(m, val, {format_spec(s): s for s in mix}, p, device)
    sizes = {s: point(m.cfg, sp[s], ra[s]) for s in SIZES}
    return sizes, [{"spec": format_spec(s), **point(m.cfg, s, rm[format_spec(s)])} for s in mix]
