"""`matryoshka study`: the experiments over sizes (presets of study/presets.py)."""

from __future__ import annotations

import argparse
import sys

from matryoshka_lm.errors import MatryoshkaError

from .options import pick_device, positive_int


def cmd_study(a: argparse.Namespace) -> None:
    from matryoshka_lm.study.presets import PRESETS, RecipePreset, get_preset
    from matryoshka_lm.study.runner import run_study

    def on_run(name: str, state: str) -> None:
        print(f"[study] {name}: {state}", file=sys.stderr, flush=True)

    if a.jobs != 1 and not isinstance(get_preset(a.preset), RecipePreset):
        recipes = ", ".join(n for n, p in PRESETS.items() if isinstance(p, RecipePreset))
        raise MatryoshkaError(f"--jobs applies to the recipe study presets ({recipes})")
    kw = dict(work=a.work, data=a.data, seed=a.seed, device=pick_device(a.device), on_run=on_run)
    res = run_study(a.preset, a.out, jobs=a.jobs, **kw)
    print(f"report written to {a.out}/README.md ({res['meta']['wall_seconds'] / 60:.1f} min)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
