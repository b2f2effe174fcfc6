"""The speed stage of `matryoshka elastify`: batch-1 decode of every size from one copy of the weights.

Each size's tokens/s is set against the device's read roofline (bandwidth / bytes of weights the size reads per
token), against transformers.generate on the same weights (what users would run instead), and speculative
decoding (a nested width draft and an early-exit draft) against the target alone. Every run generates the same
number of tokens after the same prompt, prefill included; on CUDA our decode is compiled with CUDA graphs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.spec import count_params, size_names, uniform_spec
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.speculative import speculative_decode
from matryoshka_lm.machine import describe_machine, read_bandwidth, synchronize

from .preset import ElastifyPreset

log = logging.getLogger(__name__)


def median_seconds(fn: Callable[[], Any], repeats: int, device: str) -> float:
    """Median wall time of fn() over `repeats` runs after one warm-up run (compilation, allocator)."""
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    runs = sorted(times[1:])
    return runs[len(runs) // 2]


def decode_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def measure_speed(out: Path, hf_dir: Path, p: ElastifyPreset, device: str) -> dict[str, Any]:
    path = out / "speed.json"
    if path.is_file():
        return json.loads(path.read_text())
    dtype = decode_dtype(device)
    model = ck.load_model(out / "elastic", device).to(dtype)
    tok = ck.load_tokenizer(out / "elastic")
    engine = Engine(model, compile=device.startswith("cuda"))
    prompt = tok.encode(p.prompts[0]).ids
    n = p.speed_tokens
    bw = read_bandwidth(device)
    elt = torch.finfo(dtype).bits // 8
    res: dict[str, Any] = {
        "device": describe_machine(device),
        "dtype": str(dtype).removeprefix("torch."),
        "read_bandwidth_gb_s": bw / 1e9,
        "tokens": n,
        "prompt_tokens": len(prompt),
        "compiled": engine.compiled,
        "sizes": {},
    }
    greedy: dict[str, list[int]] = {}
    for name in size_names(model.cfg):
        spec = uniform_spec(model.cfg, name)
        greedy[name] = engine.generate([prompt], spec, n)[0].tokens
        secs = median_seconds(lambda spec=spec: engine.generate([prompt], spec, n), p.speed_repeats, device)
        weight_bytes = count_params(model.cfg, spec)["total"] * elt
        res["sizes"][name] = {
            "tokens_per_s": n / secs,
            "weight_bytes": weight_bytes,
            "roofline_tokens_per_s": bw / weight_bytes,
            "roofline_fraction": (n / secs) / (bw / weight_bytes),
        }
        log.info(f"decode {name}: {n / secs:.1f} tok/s ({res['sizes'][name]['roofline_fraction']:.0%} of the roofline)")
    if p.hf_generate:
        res["transformers"] = transformers_speed(hf_dir, prompt, n, dtype, device, p.speed_repeats)
    res["speculative"] = speculative_speed(model, engine, prompt, greedy["XL"], p, device)
    res["speculative"]["target_alone_tokens_per_s"] = res["sizes"]["XL"]["tokens_per_s"]
    ck.write_json(path, res)
    return res


def speculative_speed(
    model, engine: Engine, prompt: list[int], want: list[int], p: ElastifyPreset, device: str
) -> dict[str, Any]:
    """Greedy speculative decoding of the full size with each draft: tokens/s, acceptance, and a check that the
    output is the target's own greedy output (lossless)."""
    n = p.speed_tokens
    cfg = model.cfg
    specs = {name: uniform_spec(cfg, name) for name in size_names(cfg)}
    full_depth = [name for name, s in specs.items() if s.depth == cfg.n_layers]
    exits = [name for name, s in specs.items() if s.depth < cfg.n_layers and s.width == cfg.d_model]
    drafts = {f"width {full_depth[-1]}": specs[full_depth[-1]]} if len(full_depth) > 1 else {}  # narrowest
    drafts.update({f"early exit {name} ({specs[name].depth} of {cfg.n_layers} layers)": specs[name] for name in exits})
    out: dict[str, Any] = {}
    for label, draft in drafts.items():
        last: dict[str, Any] = {}

        def run(draft=draft, last=last) -> None:
            got, stats = speculative_decode(model, prompt, None, draft, n, gamma=p.gamma, engine=engine)
            last.update(tokens=got.tokens, acceptance=stats.acceptance, per_round=stats.tokens_per_round)

        secs = median_seconds(run, p.speed_repeats, device)
        out[label] = {
            "tokens_per_s": n / secs,
            "acceptance": last["acceptance"],
            "tokens_per_target_pass": last["per_round"],
            "lossless": last["tokens"] == want,
        }
        log.info(f"speculative, {label} draft: {n / secs:.1f} tok/s, acceptance {last['acceptance']:.2f}")
    return out


def transformers_speed(
    hf_dir: Path, prompt: list[int], n: int, dtype: torch.dtype, device: str, repeats: int
) -> dict[str, Any]:
    """transformers.generate on the original weights: its default dynamic cache and, on CUDA, its static cache
    with torch.compile (the fastest setting its docs give). A failure is recorded, not raised."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device).eval()
    ids = torch.tensor([prompt], device=device)
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    modes: dict[str, dict[str, Any]] = {"dynamic cache": {}}
    if device.startswith("cuda"):
        modes["static cache, compiled"] = {"cache_implementation": "static"}
    res: dict[str, Any] = {}
    for label, extra in modes.items():
        try:
            if extra:
                hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)

            @torch.no_grad()
            def run(extra=extra) -> None:
                hf.generate(ids, **kw, **extra)

            secs = median_seconds(run, repeats, device)
            res[label] = {"tokens_per_s": n / secs}
            log.info(f"transformers.generate ({label}): {n / secs:.1f} tok/s")
        except Exception as e:  # noqa: BLE001 - a baseline that fails is reported, the recipe goes on
            res[label] = {"error": f"{type(e).__name__}: {e}"[:300]}
            log.info(f"transformers.generate ({label}) failed: {res[label]['error']}")
    return res
