"""The nesting rule has one owner: only core/nested.py slices weights, caches, layers or code bits into a size.

A size is a prefix: of each weight's rows and columns, of the KV heads, of the layers, of an embedding's features,
of a code's bits. Anywhere else such a slice is a second spelling of the rule, which drifts; the walker below fails
on one and names it, so the fix is a call into nested.py.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import matryoshka_lm

PKG = Path(matryoshka_lm.__file__).parent
OWNER = PKG / "core" / "nested.py"
WEIGHTY = re.compile(r"weight|tok_emb|lm_head|codes|qstate|\bscales?\b")
# (file, source of the subscript): prefix slices that are not a size, each with why
NOT_NESTING = {
    ("core/quant.py", "scales.repeat_interleave(group or n_in, dim=1)[:, :n_in]"): "group scales spread over columns",
    ("convert/gguf.py", "nib[..., :BLOCK // 2]"): "GGUF's block layout: the low nibbles of a block",
    ("embed/retrieval.py", "np.argpartition(-s, keep - 1, axis=1)[:, :keep]"): "the top `keep` scores",
}


def _bounded(e: ast.expr) -> bool:
    return isinstance(e, ast.Slice) and (e.lower is not None or e.upper is not None)


def _prefix(e: ast.expr) -> bool:
    """`:n` with n not a negative constant (`:-1` drops the last token: a shift, not a size)."""
    if not (isinstance(e, ast.Slice) and e.lower is None and e.upper is not None):
        return False
    u = e.upper
    return not (isinstance(u, ast.UnaryOp) and isinstance(u.op, ast.USub))


def violations(path: Path) -> list[str]:
    rel = path.relative_to(PKG).as_posix()
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.RShift):
            found.append(f"{rel}:{node.lineno}: bit shift {ast.unparse(node)} (nested.top_bits)")
            continue
        if not isinstance(node, ast.Subscript):
            continue
        elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        base, text = ast.unparse(node.value), ast.unparse(node)
        if (rel, text) in NOT_NESTING:
            continue
        if any(_bounded(e) for e in elts) and WEIGHTY.search(base):
            found.append(f"{rel}:{node.lineno}: weight slice {text} (nested.slice_views / lm_head / prefix)")
        elif any(_bounded(e) for e in elts) and re.search(r"(^|\.)layers$", base):
            found.append(f"{rel}:{node.lineno}: depth slice {text} (nested.first_layers / layers_from)")
        elif len(elts) > 1 and (
            (isinstance(elts[0], ast.Slice) and not _bounded(elts[0]) and _prefix(elts[1]))  # x[:, :n]
            or (ast.unparse(elts[0]) == "..." and _prefix(elts[-1]))  # x[..., :n]
        ):
            found.append(f"{rel}:{node.lineno}: feature prefix {text} (nested.kv_prefix / embedding_prefix)")
    return found


def test_only_nested_py_slices_into_a_size():
    bad = [v for p in sorted(PKG.rglob("*.py")) if p != OWNER for v in violations(p)]
    assert not bad, "slices of the nesting rule outside core/nested.py:\n" + "\n".join(bad)


def test_every_exception_still_exists():
    """An exception whose line has gone is removed from the list (it would silently allow a future slice)."""
    texts = set()
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).as_posix()
        texts |= {(rel, ast.unparse(n)) for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Subscript)}
    assert set(NOT_NESTING) <= texts, set(NOT_NESTING) - texts


def test_the_walker_catches_each_kind(tmp_path):
    probe = PKG / "core" / "_nesting_probe_tmp.py"
    probe.write_text(
        "def f(model, spec, cache, codes, q, x, k):\n"
        "    a = model.head_weight()[:, : x.shape[-1]]\n"
        "    b = spec.layers[:k]\n"
        "    c = codes >> 4\n"
        "    d = cache.k[0][:, :k]\n"
        "    e = q[..., :k]\n"
        "    ok = x[:, :-1], x[0, :k], x[1:], cache.k[0][:, :, :k]\n"
    )
    try:
        got = violations(probe)
    finally:
        probe.unlink()
    kinds = [v.split(": ")[1].split(" ")[0] + " " + v.split(": ")[1].split(" ")[1] for v in got]
    assert kinds == ["weight slice", "depth slice", "bit shift", "feature prefix", "feature prefix"], got
