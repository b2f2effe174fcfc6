"""README.md and plots of an elastify run, from its JSON results (plan, eval, speed); rewritable at any time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matryoshka_lm.machine import describe_machine
from matryoshka_lm.report import figure, md_table
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
    head = ["size", "params (non-embedding)", *(f"held-out: {LABELS[m]}" for m in MODELS)]
    head += ["out-of-domain: original", "out-of-domain: elastic"]
    rows = []
    for n, s in ev["sizes"].items():
        held = [f"{ev['loss'][m][n]:.3f}" for m in MODELS]
        ood = [f"{ev['ood_loss'][m][n]:.3f}" for m in ("original", "elastic")]
        rows.append([n, f"{human(s['params'])} ({human(s['non_embedding'])})", *held, *ood])
    return md_table(head, rows).split("\n")


def sample_rows(ev: dict[str, Any], prompts: list[str]) -> list[str]:
    rows = []
    teacher = ev["samples"]["original"]["XL"]
    for i, prompt in enumerate(prompts):
        cells = [["original XL", _cell(teacher[i])]]
        cells += [[f"elastic {n}", _cell(texts[i])] for n, texts in ev["samples"]["elastic"].items()]
        rows += [f"**{prompt}**", "", md_table(["model", "continuation"], cells, "ll"), ""]
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ").strip() or "(nothing)"


def speed_rows(sp: dict[str, Any]) -> list[str]:
    rows = [
        f"Batch 1, {sp['tokens']} tokens after a {sp['prompt_tokens']}-token prompt (prefill included), "
        f"{sp['dtype']} weights, our decode {'compiled (CUDA graphs)' if sp['compiled'] else 'eager'}; "
        f"read roofline = measured read bandwidth {sp['read_bandwidth_gb_s']:.0f} GB/s / bytes of weights per token.",
        "",
    ]
    decoders = [
        [f"ours, {n}", f"{s['tokens_per_s']:.1f}", f"{s['roofline_tokens_per_s']:.0f}", f"{s['roofline_fraction']:.1%}"]
        for n, s in sp["sizes"].items()
    ]
    for label, s in sp.get("transformers", {}).items():
        value = f"{s['tokens_per_s']:.1f}" if "tokens_per_s" in s else f"failed: {s['error']}"
        decoders.append([f"transformers.generate, XL, {label}", value, "", ""])
    rows.append(md_table(["decoder", "tokens/s", "roofline tokens/s", "fraction of roofline"], decoders))
    spec = sp["speculative"]
    base = spec["target_alone_tokens_per_s"]
    head = ["speculative decoding of XL", "tokens/s", "speedup vs XL alone", "acceptance", "tokens per target pass",
            "output = XL's greedy"]  # fmt: skip
    drafts = [
        [f"draft: {label}", f"{s['tokens_per_s']:.1f}", f"{s['tokens_per_s'] / base:.2f}x", f"{s['acceptance']:.2f}",
         f"{s['tokens_per_target_pass']:.2f}", "yes" if s["lossless"] else "NO"]
        for label, s in spec.items()
        if isinstance(s, dict)
    ]  # fmt: skip
    return [*rows, "", md_table(head, drafts, "lrrrrl")]


def student_rows(st: dict[str, Any]) -> list[str]:
    plan, gen = st["student_plan"], st["generated"]
    rows = [
        f"A fresh elastic model with the teacher's tokenizer, {plan['steps']} steps ({plan['tokens']:,} tokens) on "
        f"{gen['tokens']:,} tokens of teacher samples plus the corpus's training split, KL to the teacher; stored as "
        f"int8 codes in {st['ship_bytes'] / 2**20:.1f} MiB. Held-out and out-of-domain loss as above; agreement = "
        "top-1 agreement with the teacher on the held-out text.",
        "",
    ]
    head = ["size", "params", "held-out, float", "held-out, int8", "out-of-domain, int8", "agreement, int8"]
    sizes = [
        [n, human(s["params"]), f"{st['loss']['student, float'][n]:.3f}", f"{st['loss']['student, int8'][n]:.3f}",
         f"{st['ood_loss']['student, int8'][n]:.3f}", f"{st['agreement']['student, int8'][n]:.1%}"]
        for n, s in st["sizes"].items()
    ]  # fmt: skip
    teacher = st["loss"]["teacher"]["XL"], st["ood_loss"]["teacher"]["XL"]
    sizes.append(["teacher", human(st["teacher_params"]), f"{teacher[0]:.3f}", "", f"{teacher[1]:.3f}", ""])
    samples = [
        [_cell(prompt), n, _cell(texts[i])]
        for i, prompt in enumerate(st["prompts"])
        for n, texts in st["samples"].items()
    ]
    return [
        *rows,
        md_table(head, sizes),
        "",
        md_table(["prompt", "size", "greedy continuation (int8)"], samples, "lll"),
    ]


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
