"""README.md and plots of an elastify run, from its JSON results (plan, eval, speed); rewritable at any time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matryoshka_lm.machine import describe_machine
from matryoshka_lm.plots import figure
from matryoshka_lm.train.evaluate import human

from .preset import MODELS

LABELS = {
    "original": "original, naive slice",
    "reordered": "reordered, before training",
    "elastic": "elastic (distilled)",
}


def _read(out: Path, name: str) -> dict[str, Any] | None:
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


def loss_rows(ev: dict[str, Any]) -> list[str]:
    rows = [
        "| size | params (non-embedding) | " + " | ".join(f"held-out: {LABELS[m]}" for m in MODELS)
        + " | out-of-domain: original | out-of-domain: elastic |",
        "|---|---:|" + "---:|" * (len(MODELS) + 2),
    ]  # fmt: skip
    for n, s in ev["sizes"].items():
        held = " | ".join(f"{ev['loss'][m][n]:.3f}" for m in MODELS)
        ood = f"{ev['ood_loss']['original'][n]:.3f} | {ev['ood_loss']['elastic'][n]:.3f}"
        rows.append(f"| {n} | {human(s['params'])} ({human(s['non_embedding'])}) | {held} | {ood} |")
    return rows


def sample_rows(ev: dict[str, Any], prompts: list[str]) -> list[str]:
    rows = []
    teacher = ev["samples"]["original"]["XL"]
    for i, prompt in enumerate(prompts):
        rows += [f"**{prompt}**", "", "| model | continuation |", "|---|---|"]
        rows.append(f"| original XL | {_cell(teacher[i])} |")
        for n, texts in ev["samples"]["elastic"].items():
            rows.append(f"| elastic {n} | {_cell(texts[i])} |")
        rows.append("")
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ").strip() or "(nothing)"


def speed_rows(sp: dict[str, Any]) -> list[str]:
    rows = [
        f"Batch 1, {sp['tokens']} tokens after a {sp['prompt_tokens']}-token prompt (prefill included), "
        f"{sp['dtype']} weights, our decode {'compiled (CUDA graphs)' if sp['compiled'] else 'eager'}; "
        f"read roofline = measured read bandwidth {sp['read_bandwidth_gb_s']:.0f} GB/s / bytes of weights per token.",
        "",
        "| decoder | tokens/s | roofline tokens/s | fraction of roofline |",
        "|---|---:|---:|---:|",
    ]
    for n, s in sp["sizes"].items():
        rows.append(
            f"| ours, {n} | {s['tokens_per_s']:.1f} | {s['roofline_tokens_per_s']:.0f} | {s['roofline_fraction']:.1%} |"
        )
    for label, s in sp.get("transformers", {}).items():
        value = f"{s['tokens_per_s']:.1f}" if "tokens_per_s" in s else f"failed: {s['error']}"
        rows.append(f"| transformers.generate, XL, {label} | {value} | | |")
    spec = sp["speculative"]
    base = spec["target_alone_tokens_per_s"]
    rows += [
        "",
        "| speculative decoding of XL | tokens/s | speedup vs XL alone | acceptance | tokens per target pass "
        "| output = XL's greedy |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, s in spec.items():
        if isinstance(s, dict):
            rows.append(
                f"| draft: {label} | {s['tokens_per_s']:.1f} | {s['tokens_per_s'] / base:.2f}x | "
                f"{s['acceptance']:.2f} | {s['tokens_per_target_pass']:.2f} | {'yes' if s['lossless'] else 'NO'} |"
            )
    return rows


def student_rows(st: dict[str, Any]) -> list[str]:
    plan, gen = st["student_plan"], st["generated"]
    rows = [
        f"A fresh elastic model with the teacher's tokenizer, {plan['steps']} steps ({plan['tokens']:,} tokens) on "
        f"{gen['tokens']:,} tokens of teacher samples plus the corpus's training split, KL to the teacher; stored as "
        f"int8 codes in {st['ship_bytes'] / 2**20:.1f} MiB. Held-out and out-of-domain loss as above; agreement = "
        "top-1 agreement with the teacher on the held-out text.",
        "",
        "| size | params | held-out, float | held-out, int8 | out-of-domain, int8 | agreement, int8 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for n, s in st["sizes"].items():
        rows.append(
            f"| {n} | {human(s['params'])} | {st['loss']['student, float'][n]:.3f} | "
            f"{st['loss']['student, int8'][n]:.3f} | {st['ood_loss']['student, int8'][n]:.3f} | "
            f"{st['agreement']['student, int8'][n]:.1%} |"
        )
    rows.append(
        f"| teacher | {human(st['teacher_params'])} | {st['loss']['teacher']['XL']:.3f} | | "
        f"{st['ood_loss']['teacher']['XL']:.3f} | |"
    )
    rows += ["", "| prompt | size | greedy continuation (int8) |", "|---|---|---|"]
    for i, prompt in enumerate(st["prompts"]):
        rows += [f"| {_cell(prompt)} | {n} | {_cell(texts[i])} |" for n, texts in st["samples"].items()]
    return rows


def plot_losses(ev: dict[str, Any], path: Path) -> None:
    names = list(ev["sizes"])
    params = [ev["sizes"][n]["params"] / 1e6 for n in names]
    with figure(path, (10, 4), ncols=2, legend={"fontsize": 8}) as (_, axes):
        for ax, key, title in zip(axes, ("loss", "ood_loss"), ("held-out corpus text", "out-of-domain prose")):
            for m in MODELS:
                ax.plot(params, [ev[key][m][n] for n in names], marker="o", label=LABELS[m])
            for x, n in zip(params, names):
                ax.annotate(n, (x, ev[key]["elastic"][n]), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set(xlabel="parameters (M)", ylabel="loss (nats/token)", title=title)


def plot_speed(sp: dict[str, Any], path: Path) -> None:
    names = list(sp["sizes"])
    xs = range(len(names))
    with figure(path, (6, 4), grid_axis="y", legend={}) as (_, ax):
        ax.bar([x - 0.2 for x in xs], [sp["sizes"][n]["tokens_per_s"] for n in names], 0.4, label="measured")
        ax.bar([x + 0.2 for x in xs], [sp["sizes"][n]["roofline_tokens_per_s"] for n in names], 0.4, label="roofline")
        ax.set_xticks(list(xs), names)
        ax.set(ylabel="tokens/s (batch 1)", title="decode speed per size", yscale="log")


def write_report(out: Path, report: Path, device: str, command: str | None = None) -> Path:
    """Write report/README.md (and its PNGs) from out/{settings,plan,eval,speed}.json."""
    settings, plan = _read(out, "settings.json") or {}, _read(out, "plan.json") or {}
    ev, sp, st = _read(out, "eval.json"), _read(out, "speed.json"), _read(out, "student-eval.json")
    report.mkdir(parents=True, exist_ok=True)
    lines = [
        "# A pretrained LM made elastic",
        "",
        f"Machine: {sp['device'] if sp else describe_machine(device)}.",
        "",
        f"Source: `{settings.get('source')}`, imported, reordered by importance, then every size trained "
        f"jointly by distillation from the frozen original (KL to its distribution, weight {settings.get('distill')}) "
        f"on {settings.get('data') or 'the default corpus (Shakespeare + KJV)'}. "
        f"Nested axes: {', '.join(settings.get('nest', []))}"
        + (
            ", and depth for one early-exit size (E*, the first layers at full width)."
            if settings.get("exit_fraction")
            else "."
        ),  # fmt: skip
        "",
        f"Training: {plan.get('steps')} steps x {settings.get('batch_size')} x {settings.get('seq_len')} tokens "
        f"= {plan.get('tokens', 0):,} tokens, {plan.get('seconds_per_step', 0):.2f} s/step (budget "
        f"{settings.get('train_minutes')} min), lr {settings.get('lr')}.",
        "",
        "Reproduce: `" + (command or f"matryoshka elastify --out {out} --preset {settings.get('preset')}") + "`",
        "(run again until it prints the report path: each call trains within its time limit and resumes).",
        "",
    ]
    if ev:
        plot_losses(ev, report / "losses.png")
        lines += [
            "## Loss per size",
            "",
            f"Nats per token on {ev['val_tokens']:,} held-out tokens of the corpus (never trained on) and on "
            f"{ev['ood_tokens']:,} tokens of out-of-domain prose (Python's documentation).",
            "",
            *loss_rows(ev),
            "",
            "![loss per size](losses.png)",
            "",
            "## Greedy samples (the same prompts at every size)",
            "",
            *sample_rows(ev, settings.get("prompts", [])),
        ]
    if st:
        lines += ["## The small student (shipped as int8)", "", *student_rows(st), ""]
    if sp:
        plot_speed(sp, report / "speed.png")
        lines += ["## Speed", "", *speed_rows(sp), "", "![decode speed](speed.png)", ""]
    path = report / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
