"""lm-evaluation-harness on every size of one loaded checkpoint: `matryoshka harness`, no export needed.

`MatryoshkaHarnessLM` is an lm-eval model (registered as "matryoshka") that runs our model at one spec or cell
(`M`, `S,M,L,XL`, `M@int4`); `run_harness` loads a checkpoint once and runs `lm_eval.simple_evaluate` per size on
views of the same weights, and `format_tables` prints one table per task, sizes as rows.

Tokenization follows lm-eval's Hugging Face backend (TemplateLM): a (context, continuation) pair is encoded whole
and the context alone, and the continuation's tokens are what the whole has past the context's (trailing spaces of
the context move to the continuation first). Our BPE has no BOS: an empty context, and the first rolling window,
are conditioned on <|endoftext|> (data.EOT), which separates documents in training.

The shipped tasks (harness_tasks/, built by scripts/make_harness_tasks.py) are always on the include path:
  matryoshka_ppl    loglikelihood_rolling: word_perplexity, byte_perplexity, bits_per_byte (50 held-out passages)
  matryoshka_cloze  multiple_choice: acc, acc_norm (200 next-line items)
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.scoring import log_probs, token_logprobs
from matryoshka_lm.core.spec import SubmodelSpec, count_params, parse_spec, size_names
from matryoshka_lm.data import EOT
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.sampling import GREEDY

NEED_LM_EVAL = 'lm-evaluation-harness is not installed: pip install "lm-eval>=0.4"'
try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the one-line error the CLI prints (naming a missing dependency of lm-eval's)
    own = (e.name or "lm_eval").partition(".")[0] == "lm_eval"
    raise MatryoshkaError(NEED_LM_EVAL if own else f"{NEED_LM_EVAL} ({e.name} missing)") from None

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "harness_tasks"
DEFAULT_MAX_GEN_TOKS = 256
Request = tuple[Any, list[int], list[int]]  # (cache key, context tokens, continuation tokens)


@register_model("matryoshka")
class MatryoshkaHarnessLM(TemplateLM):
    """One size (spec or cell) of a loaded MatryoshkaLM as an lm-eval model. Several instances may share one model:
    nothing is copied (sizes are prefix views)."""

    def __init__(
        self,
        model: MatryoshkaLM,
        tokenizer,
        spec: SubmodelSpec | str | None = None,
        batch_size: int = 8,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        engine: Engine | None = None,
        max_length: int | None = None,
    ):
        """`max_length`: tokens per scored window (default and most: the model's context)."""
        super().__init__()
        if max_length is not None and not 1 < max_length <= model.cfg.max_seq_len:
            raise MatryoshkaError(f"max_length must be in 2..{model.cfg.max_seq_len}, got {max_length}")
        self._max_length = max_length or model.cfg.max_seq_len
        self.model = model.eval()
        self.tok = tokenizer  # not `self.tokenizer`: lm-eval reads HF attributes (pad_token...) from that
        self.spec = parse_spec(model.cfg, spec) if isinstance(spec, str) else (spec or model.full)
        self.engine = engine or Engine(model)
        self.engine.check_spec(self.spec)
        self.batch_size = int(batch_size)
        self.max_gen_toks = max_gen_toks
        eot = tokenizer.token_to_id(EOT)
        if eot is None:
            raise MatryoshkaError(f"the tokenizer has no {EOT} token")
        self._eot = eot

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> MatryoshkaHarnessLM:
        """`lm_eval --model matryoshka --model_args ckpt=DIR,size=M`: load the checkpoint here."""
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "ckpt" not in args:
            raise MatryoshkaError("model_args needs ckpt=<checkpoint dir> (and optionally size=<spec>)")
        device = str(extra.get("device") or args.get("device") or "cpu")
        bs = extra.get("batch_size", args.get("batch_size", 8))
        model = ck.load_model(Path(args["ckpt"]), device)
        return cls(
            model,
            ck.load_tokenizer(Path(args["ckpt"])),
            str(args.get("size") or "") or None,
            batch_size=8 if str(bs).startswith("auto") else int(bs),
            max_gen_toks=int(args.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)),
        )

    # ---- what TemplateLM needs

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        return self.tok.encode(string).ids  # no BOS/EOS post-processor: nothing special to add

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens))

    # ---- scoring

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False, **kw) -> list[tuple]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request.
        The input is right-truncated like lm-eval's HF backend: the last max_length tokens before each predicted
        one. Longest first, so a batch pads little; results come back in request order."""
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for s in range(0, len(order), self.batch_size):
            batch = order[s : s + self.batch_size]
            for i, res in zip(batch, self._score_batch([requests[i] for i in batch])):
                out[i] = res
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def _score_batch(self, batch: list[Request]) -> list[tuple[float, bool]]:
        rows, n_cont = [], []
        for _, ctx, cont in batch:
            if not cont:
                raise MatryoshkaError("an empty continuation has no likelihood to score")
            inp = (ctx + cont)[-(self.max_length + 1) :][:-1]
            if len(cont) > len(inp):
                log.warning("continuation of %d tokens exceeds the context; scoring its last %d", len(cont), len(inp))
            rows.append(inp)
            n_cont.append(min(len(cont), len(inp)))
        T = max(len(r) for r in rows)
        idx = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):  # right padding: causal attention keeps the pad out of real positions
            idx[b, : len(r)] = torch.tensor(r)
        logp = log_probs(self.model(idx.to(self.device), self.spec))
        res = []
        for b, (r, n, (_, _, cont)) in enumerate(zip(rows, n_cont, batch)):
            lp = logp[b, len(r) - n : len(r)]
            target = torch.tensor(cont[-n:], device=lp.device)
            res.append((float(token_logprobs(lp, target).sum()), bool((lp.argmax(-1) == target).all())))
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, over disjoint windows of max_length tokens (lm-eval's rolling windows:
        the first conditioned on <|endoftext|>, each later one on the max_length - n tokens before it)."""
        windows: list[Request] = []
        counts = []
        for (text,) in (r.args for r in requests):
            ws = [
                (None, *make_disjoint_window(w))
                for w in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            ]
            windows += ws
            counts.append(len(ws))
        scores = self._loglikelihood_tokens(windows)
        out, at = [], 0
        for req, n in zip(requests, counts):
            total = sum(s for s, _ in scores[at : at + n])
            at += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # ---- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations through the Engine, cut before the first `until` string (or <|endoftext|>), at
        most max_gen_toks tokens; the context keeps its last max_length - max_gen_toks tokens. Requests with the
        same generation settings run in batches."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        for idxs in groups.values():
            until, max_toks = self._gen_settings(requests[idxs[0]].args[1])
            for s in range(0, len(idxs), self.batch_size):
                chunk = idxs[s : s + self.batch_size]
                prompts = [self._prompt(requests[i].args[0], max_toks) for i in chunk]
                done = self.engine.generate(
                    prompts, self.spec, max_toks, GREEDY, [self._eot], until, decode=self.tok_decode
                )
                for i, c in zip(chunk, done):
                    out[i] = c.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, c.text)
        return out  # type: ignore[return-value]

    def _gen_settings(self, kwargs: dict | None) -> tuple[list[str], int]:
        kwargs = dict(kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_toks = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
            log.warning("matryoshka harness decodes greedily; ignoring sampling settings %s", kwargs)
        return until, max(1, min(max_toks, self.max_length - 1))

    def _prompt(self, context: str, max_toks: int) -> list[int]:
        ids = self.tok_encode(context) or [self.prefix_token_id]
        return ids[-(self.max_length - max_toks) :]


# ---------------------------------------------------------------- tasks


def task_manager(tasks: Sequence[str], include_path: Sequence[str | Path] | None = None):
    """An lm-eval TaskManager that knows `tasks`: ours and the include path's (a quick scan), or, for any other
    name, lm-eval's built-in tasks too (a slow scan of thousands of YAML files). Unknown names: MatryoshkaError
    listing the tasks of our folders."""
    from lm_eval.tasks import TaskManager

    paths = [TASKS_DIR]
    for p in include_path or ():
        if not Path(p).is_dir():
            raise MatryoshkaError(f"--include-path {p} is not a directory")
        paths.append(Path(p))
    local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    full = TaskManager(include_path=[str(p) for p in paths])
    unknown = [t for t in tasks if t not in full.all_tasks]
    if unknown:
        raise MatryoshkaError(
            f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; available here: "
            f"{', '.join(local.all_tasks)} (and lm-eval's own, see `lm_eval ls tasks`)"
        )
    return full


# ---------------------------------------------------------------- running and reporting


def evaluate_cell(
    model: MatryoshkaLM,
    tok,
    spec: SubmodelSpec,
    tasks: Sequence[str],
    tm=None,
    engine: Engine | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    bootstrap_iters: int = 1000,
) -> dict[str, Any]:
    """lm-eval's results for one size or cell of a loaded model (`tm`: a task_manager for our tasks)."""
    from lm_eval import simple_evaluate

    lm = MatryoshkaHarnessLM(model, tok, spec, batch_size=batch_size, engine=engine)
    tm = tm or task_manager(tasks)
    return simple_evaluate(
        model=lm, tasks=list(tasks), limit=limit, task_manager=tm, log_samples=False, bootstrap_iters=bootstrap_iters
    )


def run_harness(
    ckpt: str | Path,
    sizes: Sequence[str] | None,
    tasks: Sequence[str],
    include_path: Sequence[str | Path] | str | None = None,
    limit: int | float | None = None,
    out_json: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    bootstrap_iters: int = 1000,
) -> dict[str, Any]:
    """Evaluate each size (default: every trained size) on lm-eval `tasks`, loading the checkpoint once.

    Returns {"checkpoint", "tasks", "limit", "sizes": {size: {"spec", "params", "results": {task: lm-eval's
    metrics}, "n_samples"}}}, also written to `out_json` if given."""
    if not tasks:
        raise MatryoshkaError("no tasks given")
    ckpt = Path(ckpt)
    model = ck.load_model(ckpt, device)
    tok = ck.load_tokenizer(ckpt)
    names = list(sizes) if sizes else size_names(model.cfg)
    specs = {n: parse_spec(model.cfg, n) for n in names}  # every size checked before any is evaluated
    engine = Engine(model)
    for spec in specs.values():
        engine.check_spec(spec)
    tm = task_manager(tasks, [include_path] if isinstance(include_path, (str, Path)) else include_path)
    out: dict[str, Any] = {"checkpoint": str(ckpt), "tasks": list(tasks), "limit": limit, "sizes": {}}
    for name, spec in specs.items():
        res = evaluate_cell(model, tok, spec, tasks, tm, engine, limit, batch_size, bootstrap_iters)
        out["sizes"][name] = {
            "spec": str(spec),
            "params": count_params(model.cfg, spec)["total"],
            "results": res["results"],
            "n_samples": res.get("n-samples", {}),
        }
    if out_json:
        ck.write_json(Path(out_json), out)
    return out


def _metric_name(key: str) -> str:
    """lm-eval's 'acc,none' -> 'acc'; another filter stays: 'exact_match,flexible' -> 'exact_match[flexible]'."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}[{filt}]"


def _cell(value: Any, stderr: Any) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    text = f"{value:.4g}"
    if isinstance(stderr, (int, float)) and math.isfinite(stderr):
        text += f" ± {stderr:.2g}"
    return text


def format_tables(results: dict[str, Any]) -> str:
    """One table per task: a row per size (its parameters too), a column per metric, '± stderr' when lm-eval
    gives one."""
    sizes = results["sizes"]
    tasks: list[str] = []
    for s in sizes.values():
        tasks += [t for t in s["results"] if t not in tasks]
    tables = []
    for task in tasks:
        keys: list[str] = []
        for s in sizes.values():
            r = s["results"].get(task, {})
            # metrics are 'name,filter'; alias, name, sample_len... are not
            keys += [k for k in r if "," in k and "_stderr," not in k and k not in keys]
        head = ["size", "params"] + [_metric_name(k) for k in keys]
        rows = []
        for name, s in sizes.items():
            r = s["results"].get(task, {})
            cells = [_cell(r.get(k, "-"), r.get(k.replace(",", "_stderr,", 1))) for k in keys]
            rows.append([name, f"{s['params'] / 1e6:.2f}M", *cells])
        n = next((s["n_samples"].get(task, {}).get("effective") for s in sizes.values() if s["n_samples"]), None)
        title = f"{task}" + (f" ({n} docs)" if n else "")
        tables.append(title + "\n" + _table(head, rows))
    return "\n\n".join(tables)


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])
