"""The small elastic student of `matryoshka elastify`, the model `make demo` ships so that a CPU demo speaks English.

    generate  the frozen teacher samples continuations of short openings (its own English) into student-data/
    student   a fresh elastic model (~20 M parameters, the teacher's tokenizer) trained at every size jointly on
              those generations plus the corpus's training split, KL to the teacher's distribution
    ship      stored as int8 codes (embeddings too) under the size limit, evaluated per size on the corpus's
              held-out split (never trained on) and out-of-domain prose, with a model card (README.md)

The student trains on the corpus text of the elastic run's training split only, so the held-out windows that
`matryoshka eval` takes from the shipped checkpoint (the default corpus, the same split) are unseen.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

from matryoshka_lm.config import ModelConfig, TrainConfig
from matryoshka_lm.convert.quantize import quantize_checkpoint
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.spec import count_params, size_names, uniform_spec
from matryoshka_lm.data import SPECIAL
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.eval.texts import ood_tokens
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.sampling import Sampling
from matryoshka_lm.machine import describe_machine
from matryoshka_lm.report import md_table
from matryoshka_lm.train.budgeted import Budgeted
from matryoshka_lm.train.eval_checkpoint import checkpoint_val_split
from matryoshka_lm.train.evaluate import human

from .measure import greedy_samples, scores, size_rows
from .preset import GEN_OPENINGS, ElastifyPreset

log = logging.getLogger(__name__)

STOPS = (SPECIAL[0], "<|im_end|>")  # a teacher sample ends at either


def student_data(out: Path) -> Path:
    return out / "student-data"


def write_corpus_train_split(out: Path) -> None:
    """The corpus text of the elastic run's training split (its held-out blocks left out), decoded."""
    path = student_data(out) / "corpus-train.txt"
    if path.is_file():
        return
    _, train, _ = checkpoint_val_split(out / "elastic")
    tok = ck.load_tokenizer(out / "elastic")
    step = 1 << 16
    text = "".join(
        tok.decode(train[i : i + step].tolist(), skip_special_tokens=False) for i in range(0, len(train), step)
    )
    ck.atomic_write(path, lambda tmp: Path(tmp).write_text(text.replace(SPECIAL[0], "\n\n")))


def generate_text(out: Path, p: ElastifyPreset, device: str, time_limit_s: float | None = None) -> dict[str, Any]:
    """Append teacher samples to student-data/generated.txt until the token target or the time budget; resumable
    (generated.json counts what is there, and each batch has its own seed). `time_limit_s` bounds this call."""
    meta_path = out / "generated.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"tokens": 0, "batches": 0, "seconds": 0.0}
    if meta.get("done"):
        return meta
    write_corpus_train_split(out)
    teacher = ck.load_model(out / "reordered", device)
    if device.startswith("cuda"):
        teacher = teacher.to(torch.bfloat16)
    tok = ck.load_tokenizer(out / "reordered")
    engine = Engine(teacher, compile=device.startswith("cuda"))
    stops = [i for i in (tok.token_to_id(s) for s in STOPS) if i is not None]
    path = student_data(out) / "generated.txt"
    t0 = time.perf_counter()
    while meta["tokens"] < p.gen_tokens and meta["seconds"] + time.perf_counter() - t0 < p.gen_minutes * 60:
        rng = random.Random(meta["batches"])
        openings = [rng.choice(GEN_OPENINGS) for _ in range(p.gen_batch)]
        sampling = Sampling(temperature=1.0, top_p=0.95, seed=meta["batches"])
        done = engine.generate([tok.encode(o).ids for o in openings], None, p.gen_length, sampling, stop_tokens=stops)
        with path.open("a", encoding="utf-8") as f:  # a batch lost to a crash is regenerated: same seed
            f.write("".join(f"{o}{tok.decode(c.tokens)}\n\n" for o, c in zip(openings, done)))
        meta["tokens"] += sum(len(c.tokens) for c in done)
        meta["batches"] += 1
        ck.write_json(meta_path, {**meta, "seconds": meta["seconds"] + time.perf_counter() - t0})
        if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
            return meta  # not done (every call makes a batch of progress): the next call goes on
    meta["seconds"] += time.perf_counter() - t0
    meta["done"] = True
    ck.write_json(meta_path, meta)
    log.info(f"teacher generations: {meta['tokens']:,} tokens in {meta['seconds']:.0f} s")
    return meta


def student_job(out: Path, p: ElastifyPreset) -> Budgeted:
    def tcfg(steps: int) -> TrainConfig:
        return TrainConfig(
            steps=steps,
            batch_size=p.student_batch_size,
            seq_len=p.student_seq_len,
            grad_accum=p.grad_accum,
            lr=p.student_lr,
            warmup_steps=max(1, steps // 20),
            distill=p.distill,
            teacher=str(out / "reordered"),
            eval_every=steps,
            eval_batches=p.eval_batches,
            save_every=steps,
            dtype=p.dtype,
        )

    return Budgeted(
        run=out / "student",
        plan_path=out / "student-plan.json",
        model_cfg=ModelConfig(**p.student),
        make_tcfg=tcfg,
        minutes=p.student_minutes,
        save_minutes=p.save_minutes,
        plan_steps=p.plan_steps,
        tokenizer=out / "reordered",
    )


def ship_student(out: Path, p: ElastifyPreset, device: str, dest: Path | None = None) -> dict[str, Any]:
    """int8 codes of the student in `dest` (default out/ship) with its model card; per-size results in
    student-eval.json. Refuses a checkpoint over the size limit."""
    path = out / "student-eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    dest = dest or out / "ship"
    quantize_checkpoint(out / "student", dest, group_size=p.ship_group, embeddings=True, force=True)
    # evaluated later on the default corpus's held-out split, as the elastic run was (not the student's folder)
    _, etcfg = ck.read_config(out / "elastic")
    raw = json.loads((dest / ck.CONFIG).read_text())
    raw["train"].update(data=etcfg.data, max_corpus_chars=etcfg.max_corpus_chars, val_fraction=etcfg.val_fraction,
                        teacher=None, distill=0.0)  # fmt: skip
    ck.write_json(dest / ck.CONFIG, raw)
    size = sum(f.stat().st_size for f in dest.iterdir() if f.is_file())
    if size > p.ship_mb * 2**20:
        raise MatryoshkaError(f"the student takes {size / 2**20:.1f} MiB as int8 codes, over {p.ship_mb:g} MiB")
    res = evaluate_student(out, dest, p, device)
    res["ship_bytes"] = size
    ck.write_json(path, res)
    write_model_card(out, dest, res)
    return res


def evaluate_student(out: Path, shipped: Path, p: ElastifyPreset, device: str) -> dict[str, Any]:
    """The student (float and int8) per size on the elastic run's held-out split and out-of-domain prose, with
    top-1 agreement with the teacher; the teacher's own losses on the same windows; greedy samples at int8."""
    _, _, val = checkpoint_val_split(out / "elastic")
    tok = ck.load_tokenizer(shipped)
    token_sets = {"loss": val, "ood_loss": ood_tokens(tok)}
    res: dict[str, Any] = {"loss": {}, "ood_loss": {}, "agreement": {}}
    teacher = ck.load_model(out / "reordered", device)
    for label, ckpt in (("student, float", out / "student"), ("student, int8", shipped)):
        model = ck.load_model(ckpt, device)
        names = size_names(model.cfg)
        specs = {n: uniform_spec(model.cfg, n) for n in names}
        seq = min(p.student_seq_len, model.cfg.max_seq_len)
        got = scores(model, specs, token_sets, seq, p, device, reference=(teacher, teacher.full))
        for key, r in got.items():
            res[key][label] = {n: r[n]["loss"] for n in names}
        res["agreement"][label] = {n: got["loss"][n]["agree"] for n in names}
    res["sizes"] = size_rows(model, specs)
    res["samples"] = greedy_samples(model, tok, names, p)  # the int8 model, the last loaded
    seq = min(p.student_seq_len, teacher.cfg.max_seq_len)
    for key, r in scores(teacher, {"XL": teacher.full}, token_sets, seq, p, device).items():
        res[key]["teacher"] = {"XL": r["XL"]["loss"]}
    res["teacher_params"] = count_params(teacher.cfg, teacher.full)["total"]
    res["prompts"] = list(p.prompts)
    res["student_plan"] = json.loads((out / "student-plan.json").read_text())
    res["generated"] = json.loads((out / "generated.json").read_text())
    res["device"] = describe_machine(device)
    return res


def write_model_card(out: Path, dest: Path, res: dict[str, Any]) -> None:
    cfg, _ = ck.read_config(dest)
    source = json.loads((out / "settings.json").read_text())["source"]
    plan, gen = res["student_plan"], res["generated"]
    head = ["size", "params", "held-out loss (int8)", "out-of-domain loss (int8)", "top-1 agreement with the teacher"]
    rows = [
        [n, human(s["params"]), f"{res['loss']['student, int8'][n]:.3f}", f"{res['ood_loss']['student, int8'][n]:.3f}",
         f"{res['agreement']['student, int8'][n]:.1%}"]
        for n, s in res["sizes"].items()
    ]  # fmt: skip
    rows.append(["teacher", human(res["teacher_params"]), f"{res['loss']['teacher']['XL']:.3f}",
                 f"{res['ood_loss']['teacher']['XL']:.3f}", ""])  # fmt: skip
    samples = []
    for i, prompt in enumerate(res["prompts"]):
        samples += [f"**{prompt}**", ""] + [f"- {n}: {_line(res['samples'][n][i])}" for n in res["samples"]] + [""]
    text = f"""# matryoshka-lm demo model: a small elastic student of {source}

One set of int8 weights ({res["ship_bytes"] / 2**20:.1f} MiB, embeddings included) that runs at {len(cfg.sizes)}
nested sizes ({", ".join(cfg.sizes)}): width {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads,
FFN {cfg.ffn_dim}, SmolLM2's 49,152-token tokenizer.

- **Teacher**: `{source}` ({human(res["teacher_params"])} parameters), frozen; every size learned
  KL(teacher || size) plus the next-token loss.
- **Data**: {gen["tokens"]:,} tokens the teacher sampled from short openings (temperature 1, top-p 0.95) plus the
  training split of the default corpus (Shakespeare, the King James Bible); the held-out split was never trained on.
- **Training**: {plan["steps"]} steps, {plan["tokens"]:,} tokens, all sizes jointly, on {res["device"]}.
- **Licence**: Apache-2.0, as the teacher; the Shakespeare texts of the `shakespeare` package are CC-BY 2.5, the
  King James Bible public domain.

Losses in nats per token on the held-out corpus split and on Python's documentation (out of domain):

{md_table(head, rows)}

Greedy continuations, int8, every size:

{chr(10).join(samples)}
Use: `matryoshka generate models/demo --size all --prompt "Once upon a time"`.
"""
    (dest / "README.md").write_text(text)


def _line(text: str) -> str:
    return " ".join(text.split()) or "(nothing)"
