"""The architecture is the import graph: every import points down the layers, never sideways or up, no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import matryoshka_lm

PKG = Path(matryoshka_lm.__file__).parent
# each unit may import units of strictly lower rank, and itself
RANK = {
    "errors": 0,
    "config": 1,
    "data": 2,
    "machine": 2,
    "plots": 2,
    "core": 3,
    "report": 3,
    "train": 4,
    "infer": 4,
    "convert": 4,
    "embed": 5,
    "eval": 5,
    "mixnmatch": 5,
    "study": 6,
    "elastify": 6,
    "serve": 6,
    "cli": 7,
}


def unit_of(module: str) -> str | None:
    """'matryoshka_lm.core.spec' -> 'core'; the top package itself -> None (it only re-exports)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "matryoshka_lm" else None


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every matryoshka_lm module `path` imports (top level and inside functions)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("matryoshka_lm")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("matryoshka_lm"):
                continue
            # `from pkg import module` imports the submodule
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(
                    sub
                    if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                    or (PKG.parent / sub.replace(".", "/")).is_dir()
                    else mod
                )
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def test_every_unit_has_a_rank():
    units = {
        p.stem if p.is_file() else p.name
        for p in PKG.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert units == set(RANK), f"unranked units {units - set(RANK)}, missing {set(RANK) - units}"


def test_imports_point_down():
    bad = []
    for mod, deps in graph().items():
        src = unit_of(mod)
        if src is None:
            continue
        for dep in deps:
            dst = unit_of(dep)
            if dst is None:
                bad.append(f"{mod} imports the top package")
            elif dst != src and RANK[dst] >= RANK[src]:
                bad.append(f"{mod} ({src}, rank {RANK[src]}) imports {dep} ({dst}, rank {RANK[dst]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if d not in g:
                continue
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m != "matryoshka_lm" and m not in state:
            visit(m)


def test_checker_catches_a_bad_import(tmp_path, monkeypatch):
    """The walker sees relative imports, function-level imports and `from pkg import module`."""
    f = PKG / "core" / "_probe_tmp.py"
    f.write_text("def f():\n    from ..serve import app\n    from . import spec\n")
    try:
        deps = imports_of(f)
    finally:
        f.unlink()
    assert deps == {"matryoshka_lm.serve.app", "matryoshka_lm.core.spec"}


def test_public_names_from_the_top_package():
    from matryoshka_lm import count_params, load_model, parse_spec  # noqa: F401
    from matryoshka_lm.core.spec import parse_spec as defined

    assert parse_spec is defined
    for name in matryoshka_lm.__all__:
        assert getattr(matryoshka_lm, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        matryoshka_lm.nope  # noqa: B018


def test_the_command_line_starts_without_torch():
    """`matryoshka --help` imports the CLI only: the library (and torch) load inside the command that needs them."""
    import subprocess
    import sys

    code = (
        "import importlib, sys; importlib.import_module('matryoshka_lm.cli.main').build_parser(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
