"""Joint Matryoshka training: every step sums the LM loss of each trained size (MatFormer recipe).

Runs unchanged on one process or under torchrun (DDP by default, FSDP2 `fully_shard` with fsdp=True).
Rank 0 logs and writes checkpoints; resuming restores weights, optimizer and step from one atomic file.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.config import ModelConfig, TrainConfig
from matryoshka_lm.data import limit_chars, read_corpus, encode_corpus, sample_batch, split_tokens, train_tokenizer, unigram_loss
from matryoshka_lm.errors import MatryoshkaError
from .evaluate import evaluate_specs
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.nested import submodel_config
from matryoshka_lm.core.spec import SubmodelSpec, size_names, uniform_spec

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[Dist, str]:
    """Join the torchrun process group if launched by torchrun; pick this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local), device


class JointLoss(nn.Module):
    """One forward = the weighted sum of every trained size's loss, so DDP sees one forward per backward."""

    def __init__(self, model: MatryoshkaLM, distill: float):
        super().__init__()
        self.model = model
        self.distill = distill

    def forward(self, x: torch.Tensor, y: torch.Tensor, specs: list[SubmodelSpec], weights: list[float]):
        total = x.new_zeros((), dtype=torch.float32)
        losses = []
        full_logp = None
        for spec, w in zip(specs, weights):  # specs[0] is the largest trained size
            logits = self.model(x, spec).float()
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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio (step counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused_ok: bool) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused_ok or None)


def trained_sizes(cfg: ModelConfig, tcfg: TrainConfig) -> list[str]:
    names = size_names(cfg)
    if tcfg.sizes:
        unknown = [s for s in tcfg.sizes if s not in cfg.sizes]
        if unknown:
            raise MatryoshkaError(f"unknown sizes {unknown}; the model config has {list(cfg.sizes)}")
        names = [n for n in names if n in tcfg.sizes]
    return names


def step_sizes(names: list[str], weights: list[float], tcfg: TrainConfig, step: int) -> tuple[list[str], list[float]]:
    """The sizes trained at `step`: all, or the largest plus a seeded random subset (same on every rank)."""
    if tcfg.sample_sizes <= 0 or tcfg.sample_sizes >= len(names):
        return names, weights
    rng = random.Random(tcfg.seed * 7919 + step)
    rest = sorted(rng.sample(range(1, len(names)), tcfg.sample_sizes - 1))
    idx = [0] + rest
    return [names[i] for i in idx], [weights[i] for i in idx]


def prepare_data(tcfg: TrainConfig, data: str | None, tokenizer=None):
    docs = limit_chars(read_corpus(data), tcfg.max_corpus_chars)
    tok = tokenizer or train_tokenizer(docs, tcfg.vocab_size)
    tokens = encode_corpus(tok, docs)
    train, val = split_tokens(tokens, tcfg.val_fraction)
    if len(train) <= tcfg.seq_len + 1 or len(val) <= tcfg.seq_len + 1:
        raise MatryoshkaError(f"corpus too small: {len(tokens)} tokens for sequences of {tcfg.seq_len}")
    return tok, train, val


def _save_state(out: Path, model: MatryoshkaLM, opt: torch.optim.Optimizer, step: int, tcfg: TrainConfig,
                tok_json: str, d: Dist) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.main:
        return
    tensors = {f"model.{k}": v for k, v in msd.items()}
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{fqn}.{k}"] = torch.as_tensor(v)
    meta = {"step": str(step), "param_groups": json.dumps(osd["param_groups"])}
    ck.save_tensors(out / ck.STATE, tensors, metadata=meta)
    # inference artifacts (each atomic); the resume state above is self-contained
    ck.atomic_write(out / ck.TOKENIZER, lambda tmp: Path(tmp).write_text(tok_json))
    ck.save_tensors(out / ck.WEIGHTS, msd)
    ck.write_json(out / ck.CONFIG, {"model": model.cfg.to_dict(), "train": tcfg.to_dict()})


def _load_state(out: Path, model: MatryoshkaLM, opt: torch.optim.Optimizer) -> int:
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = out / ck.STATE
    tensors = ck.load_tensors(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "step" not in meta:
        raise MatryoshkaError(f"{path} has no step: not a matryoshka-lm trainer state")
    msd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            fqn, _, name = k[6:].rpartition(".")
            state.setdefault(fqn, {})[name] = v
    osd = {"state": state, "param_groups": json.loads(meta["param_groups"])}
    ck.load_state(model, msd, path)  # clear errors on shape mismatch before the generic loader runs
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True))
    return int(meta["step"])


def train(model_cfg: ModelConfig, tcfg: TrainConfig, out: str | Path, data: str | None = None,
          resume: bool = False, init: str | Path | None = None, device: str = "cpu",
          callback: Callable[[int, dict], None] | None = None, halt_after: int | None = None) -> Path:
    """Train a Matryoshka model (or, with tcfg.only, a dense baseline of one size's shape) into `out`.

    Args:
        model_cfg: architecture and named sizes.
        tcfg: optimisation, data and schedule settings.
        out: checkpoint directory (created; must be empty unless resuming).
        data: text file or folder; None = the embedded default corpus.
        resume: continue from out/trainer_state.safetensors.
        init: start from this checkpoint's weights and tokenizer (e.g. an imported pretrained model).
        device: "cpu", "cuda", ...
        callback: called on rank 0 after every step with the step's metrics (the CLI draws a progress bar).
        halt_after: stop (as if killed) right after the checkpoint at this step; for tests.
    """
    out = Path(out)
    d, device = init_distributed(device)
    tokenizer = None
    if resume:
        if not (out / ck.STATE).is_file():
            raise MatryoshkaError(f"cannot resume: {out / ck.STATE} does not exist")
        model_cfg, saved = ck.read_config(out)
        tcfg = saved or tcfg
        tokenizer = ck.load_tokenizer(out)
    elif init is not None:
        model_cfg, _ = ck.read_config(Path(init))
        tokenizer = ck.load_tokenizer(Path(init))
    elif out.exists() and any(out.iterdir()):
        raise MatryoshkaError(f"output directory {out} is not empty; use --resume to continue or pick a new --out")

    if data is not None:
        tcfg.data = str(data)
    tok, train_tokens, val_tokens = prepare_data(tcfg, tcfg.data, tokenizer)
    if not resume and init is None:
        model_cfg.vocab_size = tok.get_vocab_size()
        model_cfg.max_seq_len = max(model_cfg.max_seq_len, tcfg.seq_len)
    if tcfg.only:
        if tcfg.only not in model_cfg.sizes:
            raise MatryoshkaError(f"--only {tcfg.only}: unknown size; the config has {list(model_cfg.sizes)}")
        if model_cfg.sizes.keys() != {"XL"} or tcfg.only != "XL":
            model_cfg = submodel_config(model_cfg, uniform_spec(model_cfg, tcfg.only))
    names = trained_sizes(model_cfg, tcfg) if not tcfg.only else ["XL"]
    weights = tcfg.size_weights or [1.0] * len(names)
    if len(weights) != len(names):
        raise MatryoshkaError(f"{len(weights)} size weights for {len(names)} sizes {names}")
    specs = {n: uniform_spec(model_cfg, n) for n in names}

    per_rank = tcfg.batch_size // d.world
    if tcfg.batch_size % (d.world * tcfg.grad_accum):
        raise MatryoshkaError(f"batch_size={tcfg.batch_size} must divide by world size {d.world} x grad_accum {tcfg.grad_accum}")
    micro = per_rank // tcfg.grad_accum

    torch.manual_seed(tcfg.seed)
    model = MatryoshkaLM(model_cfg)
    if init is not None and not resume:
        ck.load_state(model, ck.load_tensors(Path(init) / ck.WEIGHTS), Path(init) / ck.WEIGHTS)
    model.to(device)
    joint = JointLoss(model, tcfg.distill)
    runner: nn.Module = joint
    if d.world > 1 and tcfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    elif d.world > 1:
        runner = nn.parallel.DistributedDataParallel(joint, device_ids=[d.local_rank] if device.startswith("cuda") else None)
    opt = make_optimizer(model, tcfg, fused_ok=device.startswith("cuda"))

    start = 0
    if resume:
        start = _load_state(out, model, opt)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        _trim_metrics(out / "metrics.jsonl", start)
    tok_json = tok.to_str()
    use_bf16 = tcfg.dtype == "bf16" or (tcfg.dtype == "auto" and device.startswith("cuda") and torch.cuda.is_bf16_supported())
    autocast = (lambda: torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)) if use_bf16 else nullcontext

    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    t0 = time.perf_counter()
    for step in range(start, tcfg.steps):
        step_names, step_w = step_sizes(names, weights, tcfg, step)
        step_specs = [specs[n] for n in step_names]
        lr = lr_at(step, tcfg)
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        x_all, y_all = sample_batch(train_tokens, tcfg.batch_size, tcfg.seq_len, tcfg.seed, step)
        x_rank, y_rank = x_all[d.rank * per_rank:(d.rank + 1) * per_rank], y_all[d.rank * per_rank:(d.rank + 1) * per_rank]
        step_losses = torch.zeros(len(step_names), device=device)
        for m in range(tcfg.grad_accum):
            x = x_rank[m * micro:(m + 1) * micro].to(device)
            y = y_rank[m * micro:(m + 1) * micro].to(device)
            sync = m == tcfg.grad_accum - 1
            ctx = runner.no_sync() if (not sync and isinstance(runner, nn.parallel.DistributedDataParallel)) else nullcontext()
            with ctx, autocast():
                total, losses = runner(x, y, step_specs, step_w)
            with ctx:
                (total / tcfg.grad_accum).backward()
            step_losses += losses / tcfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if d.world > 1:  # report the global-batch loss, not rank 0's shard
            dist.all_reduce(step_losses, op=dist.ReduceOp.AVG)
        done = step + 1
        elapsed = time.perf_counter() - t0
        metrics = {"step": done, "lr": lr, "grad_norm": float(grad_norm),
                   "loss": {n: float(v) for n, v in zip(step_names, step_losses)},
                   "tokens_per_s": tokens_per_step * (done - start) / elapsed}
        if done % tcfg.eval_every == 0 or done == tcfg.steps:
            res = evaluate_specs(model, val_tokens, specs, tcfg.seq_len, batch=8,
                                 n_batches=tcfg.eval_batches, device=device)
            metrics["val_loss"] = {n: r["loss"] for n, r in res.items()}
        if d.main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if callback:
                callback(done, metrics)
        if done % tcfg.save_every == 0 or done == tcfg.steps:
            _save_state(out, model, opt, done, tcfg, tok_json, d)
            if d.main:
                _write_split_stats(out, train_tokens, val_tokens, model_cfg.vocab_size)
            if halt_after is not None and done >= halt_after:
                break
    return out


def _trim_metrics(path: Path, upto: int) -> None:
    """On resume, drop logged steps after the checkpoint so the log has each step once."""
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= upto]
    ck.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keep)))


def _write_split_stats(out: Path, train: np.ndarray, val: np.ndarray, vocab: int) -> None:
    if (out / "data.json").exists():
        return
    ck.write_json(out / "data.json", {"train_tokens": int(len(train)), "val_tokens": int(len(val)),
                                      "unigram_loss": unigram_loss(train, val, vocab)})
