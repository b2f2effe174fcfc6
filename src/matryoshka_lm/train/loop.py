"""Joint Matryoshka training: every step sums the LM loss of each trained size (MatFormer recipe).

Runs unchanged on one process or under torchrun (DDP by default, FSDP2 `fully_shard` with fsdp=True; see
parallelize.py). Rank 0 logs (tokens/s, MFU) and writes checkpoints; a resume restores weights, optimizer and step
from one atomic file (state.py) and may change some settings (resume.py).

    train()  =  load_settings()  ->  prepare()  ->  run_steps() -> steps.fit(), the one training loop
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from matryoshka_lm.config import ModelConfig, TrainConfig
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core import quant
from matryoshka_lm.core.chat import copy_chat
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.nested import submodel_config
from matryoshka_lm.core.spec import SubmodelSpec, uniform_spec
from matryoshka_lm.data import sample_batch
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.machine import peak_flops

from .evaluate import evaluate_specs
from .optim import lr_at, make_optimizer
from .parallelize import Dist, any_rank, global_mean, init_distributed, no_sync_of, parallelize
from .plan import size_plan, step_flops, step_sizes, step_submodels, trained_sizes
from .resume import resume_settings
from .speedups import apply_speedups, use_fused_adamw
from .state import load_state, save_state, trim_metrics, write_split_stats
from .steps import MetricsLog, MicroStep, fit
from .tokens import data_source, prepare_data

log = logging.getLogger(__name__)

__all__ = [
    "train",
    "JointLoss",
    "lr_at",
    "make_optimizer",
    "prepare_data",
    "step_sizes",
    "trained_sizes",
    "Dist",
    "init_distributed",
]


class JointLoss(nn.Module):
    """One forward = the weighted sum of every trained size's loss, so DDP sees one forward per backward.

    A spec with a bit width (quantization-aware training) runs on its fake-quantized weights (quant.fake_quant:
    round-to-nearest int8, top bits, straight-through gradient), computed once per width per forward."""

    def __init__(self, model: MatryoshkaLM, distill: float, teacher: MatryoshkaLM | None = None):
        super().__init__()
        self.model = model
        self.distill = distill
        # not a submodule: DDP/FSDP, the optimizer and checkpoints never see the frozen teacher
        object.__setattr__(self, "teacher", teacher)

    def logits(self, x: torch.Tensor, spec: SubmodelSpec, fq: dict[int, dict[str, torch.Tensor]]) -> torch.Tensor:
        if spec.bits is None:
            return self.model(x, spec)
        if spec.bits not in fq:
            fq[spec.bits] = quant.fake_quant_params(
                dict(self.model.named_parameters()), spec.bits, self.model.precision.quant
            )
        return functional_call(self.model, fq[spec.bits], (x, spec.shape))

    def forward(self, x: torch.Tensor, y: torch.Tensor, specs: list[SubmodelSpec], weights: list[float]):
        total = x.new_zeros((), dtype=torch.float32)
        losses = []
        full_logp = None
        if self.teacher is not None and self.distill > 0:
            with torch.no_grad():  # the soft target of every size, the full one too
                full_logp = F.log_softmax(self.teacher(x).float(), -1)
        fq: dict[int, dict[str, torch.Tensor]] = {}
        for spec, w in zip(specs, weights):  # specs[0] is the largest trained size (at the widest bits)
            with torch.no_grad() if w == 0 else nullcontext():  # weight 0: a distillation teacher, not trained
                logits = self.logits(x, spec, fq).float()
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            loss = ce
            if self.distill > 0:
                logp = F.log_softmax(logits, -1)
                if full_logp is None:
                    full_logp = logp.detach()
                else:  # KL(full || size), the full model's distribution as a soft target
                    kl = F.kl_div(logp.flatten(0, 1), full_logp.flatten(0, 1), log_target=True, reduction="batchmean")
                    loss = ce + self.distill * kl
            total = total + w * loss
            losses.append(ce.detach())
        return total, torch.stack(losses)


# ---------------------------------------------------------------- load: which model, settings and tokenizer


def load_settings(
    model_cfg: ModelConfig,
    tcfg: TrainConfig,
    out: Path,
    data: str | None,
    resume: bool,
    init: str | Path | None,
    changes: dict[str, Any] | None,
) -> tuple[ModelConfig, TrainConfig, Any]:
    """(model config, train config, tokenizer or None) of a new, initialised or resumed run."""
    if resume:
        if not (out / ck.STATE).is_file():
            raise MatryoshkaError(f"cannot resume: {out / ck.STATE} does not exist")
        model_cfg, tcfg, _ = resume_settings(out, tcfg, changes, None if data is None else str(data))
        return model_cfg, tcfg, ck.load_tokenizer(out)
    tokenizer = None
    if init is not None:
        model_cfg, _ = ck.read_config(Path(init))
        tokenizer = ck.load_tokenizer(Path(init))
    elif out.exists() and any(out.iterdir()):
        raise MatryoshkaError(f"output directory {out} is not empty; use --resume to continue or pick a new --out")
    if data is not None:
        tcfg.data = str(data)
    return model_cfg, tcfg, tokenizer


def shape_for_run(model_cfg: ModelConfig, tcfg: TrainConfig, vocab: int, fresh: bool) -> ModelConfig:
    """A fresh model takes the tokenizer's vocabulary; --only trains a dense model of one size's shape."""
    if fresh:
        model_cfg.vocab_size = vocab
        model_cfg.max_seq_len = max(model_cfg.max_seq_len, tcfg.seq_len)
    if tcfg.only:
        if tcfg.only not in model_cfg.sizes:
            raise MatryoshkaError(f"--only {tcfg.only}: unknown size; the config has {list(model_cfg.sizes)}")
        if model_cfg.sizes.keys() != {"XL"} or tcfg.only != "XL":
            model_cfg = submodel_config(model_cfg, uniform_spec(model_cfg, tcfg.only))
    return model_cfg


# ---------------------------------------------------------------- prepare: data, model, optimizer, state


@dataclass
class Run:
    """Everything a step needs."""

    tcfg: TrainConfig
    d: Dist
    device: str
    model: MatryoshkaLM
    runner: nn.Module  # what computes the joint loss: JointLoss, or its DDP wrapper
    opt: torch.optim.Optimizer
    names: list[str]
    weights: list[float]
    specs: dict[str, SubmodelSpec]
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    autocast: Callable[[], AbstractContextManager]
    out: Path
    tok_json: str
    log: MetricsLog
    start: int = 0
    peak_flops: float = 0.0  # of one device (machine.peak_flops); 0: no MFU in the metrics
    source: str | None = None  # what the tokens came from: tcfg.data, or the cache folder it was prepared into


def check_batch_split(tcfg: TrainConfig, d: Dist) -> None:
    if tcfg.batch_size % (d.world * tcfg.grad_accum):
        raise MatryoshkaError(
            f"batch_size={tcfg.batch_size} must divide by world size {d.world} x grad_accum {tcfg.grad_accum}"
        )


def autocast_for(tcfg: TrainConfig, device: str) -> Callable[[], AbstractContextManager]:
    use_bf16 = tcfg.dtype == "bf16" or (
        tcfg.dtype == "auto" and device.startswith("cuda") and torch.cuda.is_bf16_supported()
    )
    if not use_bf16:
        return nullcontext
    return lambda: torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)


def prepare(
    model_cfg: ModelConfig,
    tcfg: TrainConfig,
    tokenizer: Any,
    out: Path,
    d: Dist,
    device: str,
    resume: bool,
    init: str | Path | None,
    callback: Callable[[int, dict], None] | None,
) -> Run:
    source = data_source(tcfg, tcfg.data, tokenizer)
    tok, train_tokens, val_tokens = prepare_data(tcfg, source, tokenizer)
    model_cfg = shape_for_run(model_cfg, tcfg, tok.get_vocab_size(), fresh=not resume and init is None)
    names, weights, specs = size_plan(model_cfg, tcfg)
    check_batch_split(tcfg, d)
    torch.manual_seed(tcfg.seed)
    model = MatryoshkaLM(model_cfg)
    model.precision.quant = quant.QuantConfig(tcfg.quant_group)  # how its cells quantize, in training and eval
    if init is not None and not resume:
        ck.load_state(model, ck.load_tensors(Path(init) / ck.WEIGHTS), Path(init) / ck.WEIGHTS)
    model.to(device)
    apply_speedups(model, tcfg)
    teacher = load_teacher(tcfg, model_cfg, tok, device)
    runner = parallelize(JointLoss(model, tcfg.distill, teacher), model.layers, model, d, device, tcfg.fsdp)
    opt = make_optimizer(model, tcfg, fused_ok=use_fused_adamw(tcfg, device))
    start = load_state(out, model, opt) if resume else 0
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        trim_metrics(out / "metrics.jsonl", start)
        if init is not None and not resume:  # an imported model's chat format stays with its fine-tunes
            copy_chat(init, out)
    return Run(
        tcfg,
        d,
        device,
        model,
        runner,
        opt,
        names,
        weights,
        specs,
        train_tokens,
        val_tokens,
        autocast_for(tcfg, device),
        out,
        tok.to_str(),
        MetricsLog(out / "metrics.jsonl", callback, d.main),
        start,
        source=source,
    )


def load_teacher(tcfg: TrainConfig, model_cfg: ModelConfig, tok: Any, device: str) -> MatryoshkaLM | None:
    """The frozen teacher of tcfg.teacher (its full model), checked to share the run's tokenizer."""
    if tcfg.teacher is None:
        return None
    path = Path(tcfg.teacher)
    if not (path / ck.WEIGHTS).is_file():
        raise MatryoshkaError(f"teacher {path}: no {ck.WEIGHTS} there; give a checkpoint directory")
    if ck.load_tokenizer(path).to_str() != tok.to_str():
        raise MatryoshkaError(f"teacher {path} has another tokenizer: its distribution is over different tokens")
    teacher = ck.load_model(path, device)
    if teacher.cfg.vocab_size != model_cfg.vocab_size:
        raise MatryoshkaError(
            f"teacher {path} has a vocabulary of {teacher.cfg.vocab_size}, the student {model_cfg.vocab_size}"
        )
    return teacher.eval().requires_grad_(False)


# ---------------------------------------------------------------- step and run


def step_micro_steps(run: Run, step: int) -> list[MicroStep]:
    """This rank's micro-batches of the global batch of (0-based) `step`, each a joint forward of its sizes."""
    tcfg, d = run.tcfg, run.d
    _, step_specs, step_w = step_submodels(run.model.cfg, tcfg, (run.names, run.weights, run.specs), step)
    run.model.train()
    per_rank = tcfg.batch_size // d.world
    micro = per_rank // tcfg.grad_accum
    x_all, y_all = sample_batch(run.train_tokens, tcfg.batch_size, tcfg.seq_len, tcfg.seed, step)
    x_rank, y_rank = (
        x_all[d.rank * per_rank : (d.rank + 1) * per_rank],
        y_all[d.rank * per_rank : (d.rank + 1) * per_rank],
    )

    def micro_step(m: int) -> MicroStep:
        x, y = x_rank[m * micro : (m + 1) * micro].to(run.device), y_rank[m * micro : (m + 1) * micro].to(run.device)
        return lambda: run.runner(x, y, step_specs, step_w)

    return [micro_step(m) for m in range(tcfg.grad_accum)]


def step_report(run: Run, step: int, lr: float, losses: torch.Tensor, grad_norm: torch.Tensor) -> dict[str, Any]:
    """The step's metrics: its sizes' losses averaged over ranks."""
    step_names = step_submodels(run.model.cfg, run.tcfg, (run.names, run.weights, run.specs), step)[0]
    global_mean(losses, run.d)
    return {
        "step": step + 1,
        "lr": lr,
        "grad_norm": float(grad_norm),
        "loss": {n: float(v) for n, v in zip(step_names, losses)},
    }


def run_steps(run: Run, halt_after: int | None = None, time_limit_s: float | None = None) -> int:
    """Steps run.start .. tcfg.steps (steps.fit): evaluate, log and checkpoint at their cadences and at the last
    step.

    With time_limit_s, the first step that ends past the limit is checkpointed and the run stops there (a
    `resume` continues it). Returns the last step done."""
    tcfg = run.tcfg
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    plan, flops = (run.names, run.weights, run.specs), [0.0]
    t0 = time.perf_counter()

    def after_step(done: int, metrics: dict) -> bool:
        late = time_limit_s is not None and any_rank(time.perf_counter() - t0 > time_limit_s, run.d, run.device)
        elapsed = time.perf_counter() - t0
        metrics["tokens_per_s"] = tokens_per_step * (done - run.start) / elapsed
        flops[0] += step_flops(run.model.cfg, tcfg, plan, done - 1)  # every trained size, forward + backward
        metrics["flops_per_s"] = flops[0] / elapsed
        if run.peak_flops:  # of every rank's devices
            metrics["mfu"] = metrics["flops_per_s"] / (run.peak_flops * run.d.world)
        if done % tcfg.eval_every == 0 or done == tcfg.steps:
            res = evaluate_specs(
                run.model,
                run.val_tokens,
                run.specs,
                tcfg.seq_len,
                batch=8,
                n_batches=tcfg.eval_batches,
                device=run.device,
            )
            metrics["val_loss"] = {n: r["loss"] for n, r in res.items()}
        run.log(done, metrics)
        if done % tcfg.save_every == 0 or done == tcfg.steps or late:
            save_state(run.out, run.model, run.opt, done, tcfg, run.tok_json, run.d.main)
            if run.d.main:
                write_split_stats(run.out, run.train_tokens, run.val_tokens, run.model.cfg.vocab_size, run.source)
            return late or (halt_after is not None and done >= halt_after)
        return False

    return fit(
        run.opt,
        list(run.model.parameters()),
        tcfg,
        partial(step_micro_steps, run),
        run.start,
        after_step,
        partial(step_report, run),
        no_sync_of(run.runner),
        run.autocast,
    )


def train(
    model_cfg: ModelConfig,
    tcfg: TrainConfig,
    out: str | Path,
    data: str | None = None,
    resume: bool = False,
    init: str | Path | None = None,
    device: str = "cpu",
    callback: Callable[[int, dict], None] | None = None,
    halt_after: int | None = None,
    changes: dict[str, Any] | None = None,
    time_limit_s: float | None = None,
    tokenizer: str | Path | None = None,
    peak_tflops: float | None = None,
) -> Path:
    """Train a Matryoshka model (or, with tcfg.only, a dense baseline of one size's shape) into `out`.

    Args:
        model_cfg: architecture and named sizes (on resume, the checkpoint's are used).
        tcfg: optimisation, data and schedule settings.
        out: checkpoint directory (created; must be empty unless resuming).
        data: text file or folder, or a folder of `matryoshka prepare` shards (read by memory map; its
            tokenizer is the run's); None = tcfg.data (None there too: the embedded default corpus).
        resume: continue from out/trainer_state.safetensors with the saved settings, changed by `changes`:
            steps, eval/save cadence, LR schedule, grad_clip, grad_accum, dtype and fsdp may change; any other
            difference raises MatryoshkaError naming it (see train/resume.py). With steps not beyond the
            checkpoint's step there is nothing to train: MatryoshkaError says so.
        init: start from this checkpoint's weights and tokenizer (e.g. an imported pretrained model).
        device: "cpu", "cuda", ...
        callback: called on rank 0 after every step with the step's metrics (the CLI draws a progress bar).
        halt_after: stop (as if killed) right after the checkpoint at this step; for tests.
        time_limit_s: wall-clock seconds of training for this call: the step that ends past it is checkpointed
            and the call returns; `resume=True` continues (a long run split into bounded commands).
        tokenizer: a checkpoint directory whose tokenizer a fresh model uses instead of a new BPE (a student
            distilled from a teacher must share its tokens).
        peak_tflops: one device's peak for the metrics' MFU (default: machine.peak_flops, known or measured).
        changes: on resume, the settings the user gave explicitly ({TrainConfig field: value}, None = not
            given). None: every field where `tcfg` differs from the saved settings counts as given.
    """
    out = Path(out)
    d, device = init_distributed(device)
    model_cfg, tcfg, tok = load_settings(model_cfg, tcfg, out, data, resume, init, changes)
    if tokenizer is not None and tok is None:
        tok = ck.load_tokenizer(Path(tokenizer))
    elif tokenizer is not None and tok.to_str() != ck.load_tokenizer(Path(tokenizer)).to_str():
        raise MatryoshkaError(f"tokenizer {tokenizer}: the run already has another tokenizer (from --init or --resume)")
    run = prepare(model_cfg, tcfg, tok, out, d, device, resume, init, callback)
    run.peak_flops = peak_flops(device, peak_tflops)[0]
    run_steps(run, halt_after, time_limit_s)
    return out
