"""The CUDA paths, on a GPU (the whole module is skipped without one): the model and its slices on CUDA compute
what they do on the CPU and as extracted models; bf16 autocast stays close to fp32, fake quantization included;
the engine's compiled decoding (static KV cache, mode="reduce-overhead": CUDA graphs) and speculative decoding give
the eager greedy tokens; size routing runs there; training in fp32 and bf16 lowers the loss and resumes where it
stopped; FSDP2 in one process on NCCL trains like the unsharded model, through `matryoshka train` too.

Each test is small (tiny models); the compiled ones spend their time compiling. fp32 here means fp32 matmuls:
nothing in the project turns TF32 on, which the CPU comparisons rely on."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _chain_model import chain_trained_model
from conftest import tiny_config, tiny_train_config
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core import quant
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import parse_spec, uniform_spec
from matryoshka_lm.infer.engine import Engine, view_model
from matryoshka_lm.infer.speculative import speculative_decode
from matryoshka_lm.train.loop import JointLoss, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
SIZES = ["XL", "L", "M", "S"]
SPECS = [*SIZES, "S,M,L,XL", "f16h2,f64h4,f8h2@d24"]  # named sizes and two Mix'n'Match specs
PROMPTS = [[5, 17, 3, 88, 41, 2, 9], [60, 1, 33]]  # different lengths: a left-padded batch
TESTS = Path(__file__).parent


def spread_model(std: float = 0.3, seed: int = 0) -> MatryoshkaLM:
    """Random weights spread wider than the init (norm gains too), so logits are far from uniform and greedy
    tokens vary; on the CPU, to be moved."""
    torch.manual_seed(seed)
    m = MatryoshkaLM(tiny_config())
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else std * torch.randn_like(p))
    return m.eval()


def tokens_in(n: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, n, (2, length), generator=torch.Generator().manual_seed(seed))


def close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """Equal up to `rel` of the reference's largest magnitude (fp32 rounding differs between devices/kernels)."""
    scale = want.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(got.cpu().float(), want.cpu().float(), rtol=rel, atol=rel * scale)


# ---------------------------------------------------------------- the model on CUDA


@pytest.mark.parametrize("size", SPECS)
def test_forward_on_cuda_equals_the_cpu(size):
    cpu = spread_model(std=0.1)
    gpu = copy.deepcopy(cpu).to(DEVICE)
    spec = parse_spec(cpu.cfg, size)
    x = tokens_in(cpu.cfg.vocab_size, 24)
    with torch.no_grad():
        want, got = cpu(x, spec), gpu(x.to(DEVICE), spec)
    assert got.device.type == "cuda" and got.dtype == torch.float32
    close(got, want, 1e-4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus_file):
    from _tiny_ckpt import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("cuda") / "ckpt", corpus_file)


@pytest.mark.parametrize("size", SPECS)
def test_sliced_submodel_on_cuda_equals_the_extracted_one(ckpt, tmp_path, size):
    """The spec run inside the full model, the engine's zero-copy view model of it and the standalone extracted
    checkpoint compute the same logits on CUDA."""
    from matryoshka_lm.convert.extract import extract_submodel

    full = ck.load_model(ckpt, DEVICE)
    spec = parse_spec(full.cfg, size)
    small = ck.load_model(extract_submodel(ckpt, size, tmp_path / "sub"), DEVICE)
    view = view_model(full, spec)
    assert next(small.parameters()).device.type == next(view.parameters()).device.type == "cuda"
    x = tokens_in(full.cfg.vocab_size, 24).to(DEVICE)
    with torch.no_grad():
        sliced = full(x, spec)
        close(small(x), sliced, 1e-4)
        close(view(x), sliced, 1e-4)


@pytest.mark.parametrize("size", SIZES)
def test_bf16_autocast_forward_is_close_to_fp32(size):
    """Logits within 5% of their range (~1.5% seen with CPU autocast), the loss within 0.02 nats (~0.001 seen),
    and the same top token almost everywhere."""
    model = spread_model(std=0.1).to(DEVICE)
    spec = uniform_spec(model.cfg, size)
    x = tokens_in(model.cfg.vocab_size, 33).to(DEVICE)
    with torch.no_grad():
        fp32 = model(x[:, :-1], spec)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(x[:, :-1], spec)
    assert bf16.dtype == torch.bfloat16 and not torch.equal(bf16.float(), fp32)  # autocast really ran
    close(bf16, fp32, 0.05)
    ce = [F.cross_entropy(z.float().flatten(0, 1), x[:, 1:].flatten()).item() for z in (fp32, bf16)]
    assert abs(ce[1] - ce[0]) < 0.02, ce
    agree = (bf16.argmax(-1) == fp32.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree


def test_quantization_aware_loss_in_bf16_on_cuda():
    """Fake-quantized cells (int8/int4/int2 at two sizes) under bf16 autocast: losses within 0.05 nats of fp32, a
    step lowers all of them, and (in fp32) the training forward is what the served cell computes on CUDA."""
    torch.manual_seed(0)
    model = MatryoshkaLM(tiny_config()).to(DEVICE)
    model.precision.quant = quant.QuantConfig(8)
    specs = [uniform_spec(model.cfg, n).at_bits(b) for b in (8, 4, 2) for n in ("XL", "S")]
    loss_fn, w = JointLoss(model, distill=0.0), [1.0] * len(specs)
    x = tokens_in(model.cfg.vocab_size, 17, seed=2).to(DEVICE)
    x, y = x[:, :-1], x[:, 1:]
    with torch.no_grad():
        fp32 = loss_fn(x, y, specs, w)[1]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, before = loss_fn(x, y, specs, w)
    assert torch.isfinite(before).all() and (before - fp32).abs().max() < 0.05, (before, fp32)
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            after = loss_fn(x, y, specs, w)[1]
        assert (after < before).all(), (before, after)
        trained = loss_fn(x, y, specs, w)[1]
        for spec, loss in zip(specs, trained):
            served = F.cross_entropy(model.eval()(x, spec).flatten(0, 1), y.flatten())
            torch.testing.assert_close(served, loss, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the engine on CUDA


@pytest.fixture(scope="module")
def engine_model() -> MatryoshkaLM:
    return spread_model().to(DEVICE)


def naive_greedy(model: MatryoshkaLM, prompt: list[int], spec, n: int) -> list[int]:
    """No cache: the whole sequence re-run every step."""
    x = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            x.append(int(model(torch.tensor([x], device=DEVICE), spec)[0, -1].argmax()))
    return x[len(prompt) :]


@pytest.mark.parametrize("size", ["XL", "M"])
def test_eager_cached_decoding_on_cuda_equals_recomputing(engine_model, size):
    spec = uniform_spec(engine_model.cfg, size)
    got = [c.tokens for c in Engine(engine_model).generate(PROMPTS, spec, 10)]
    assert got == [naive_greedy(engine_model, p, spec, 10) for p in PROMPTS]


def test_compiled_cuda_graph_decoding_equals_eager(engine_model):
    """Engine(compile=True) on CUDA: torch.compile(mode="reduce-overhead") of the static-cache step, with no graph
    break and no CUDA graph skipped, gives eager's greedy tokens at two sizes, at batch 1 and on a left-padded
    batch of 2; generating again replays the recorded graphs on the reused caches and gives them again."""
    from torch._dynamo.utils import counters

    eager, compiled = Engine(engine_model), Engine(engine_model, compile=True)
    counters.clear()
    for size in ("XL", "S"):
        spec = uniform_spec(engine_model.cfg, size)
        for prompts in ([PROMPTS[0]], PROMPTS):
            want = [c.tokens for c in eager.generate(prompts, spec, 12)]
            for _ in range(2):
                assert [c.tokens for c in compiled.generate(prompts, spec, 12)] == want, (size, len(prompts))
    assert not counters["graph_break"], dict(counters["graph_break"])
    # a skipped graph still decodes correctly, but then reduce-overhead is not what ran (TORCH_LOGS=perf_hints)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


@pytest.fixture(scope="module")
def chain_model() -> MatryoshkaLM:
    """All sizes briefly trained on a noisy chain (tests/_chain_model.py)."""
    return chain_trained_model(DEVICE)


@pytest.fixture(scope="module")
def spec_engines(chain_model) -> dict[str, Engine]:
    """One eager and one compiled engine for every speculative case (the compiled graphs are shared)."""
    return {"eager": Engine(chain_model), "compiled": Engine(chain_model, compile=True)}


@pytest.mark.parametrize("kind", ["eager", "compiled"])
@pytest.mark.parametrize(
    ("draft", "share"),
    [("S", False), ("S", True), ("XL,XL", False)],  # own cache, the target's cache, early exit (reused states)
)
def test_speculative_decoding_on_cuda_gives_the_target_greedy(chain_model, spec_engines, kind, draft, share):
    eager = spec_engines["eager"]
    accepted = drafted = 0
    for prompt in ([5, 17, 3, 88, 41, 2, 9], [60, 1], [33, 12, 70, 70, 4]):  # one cache length: fewer graphs
        want = eager.generate([prompt], None, 16)[0].tokens
        done, stats = speculative_decode(
            chain_model,
            prompt,
            None,
            parse_spec(chain_model.cfg, draft),
            16,
            gamma=4,
            adaptive=False,  # a fixed γ: one verify shape, so few graphs to compile
            share_cache=share,
            engine=spec_engines[kind],
        )
        assert done.tokens == want, (prompt, draft, share)
        accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    assert 0 < accepted < drafted, (accepted, drafted)


def test_routing_on_cuda_serves_the_chosen_size(engine_model):
    """The router's predictor (loaded on the CPU) reads features computed on CUDA; the routed tokens are the
    engine's at the chosen size, the router's prefill reused when that is the smallest."""
    from _tiny_router import length_router
    from matryoshka_lm.infer.routed import routed_generate

    engine = Engine(engine_model)
    router = length_router(engine.cfg)
    short, long = [7, 30, 71, 5], [(11 * i + 3) % 97 for i in range(20)]
    for prompt, size in ((short, "S"), (long, "XL")):
        decision, done = routed_generate(engine, router, prompt, 12, tolerance=0.1)
        assert decision.spec == parse_spec(engine.cfg, size) and decision.reuses_prefill == (size == "S")
        assert done.tokens == engine.generate([prompt], parse_spec(engine.cfg, size), 12)[0].tokens


# ---------------------------------------------------------------- training on CUDA


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_on_cuda_in_fp32_and_bf16_lowers_the_loss(tmp_path):
    """30 steps of every size on the default corpus (limited), in fp32 and in bf16 autocast: finite losses that
    fall at every size; bf16 starts where fp32 does (same weights, same batch) without being fp32; the
    checkpoint holds fp32 weights (autocast only) that load on CUDA."""
    runs = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        train(
            tiny_config(), tiny_train_config(steps=30, eval_every=30, eval_batches=4, dtype=dtype), out, device=DEVICE
        )
        m = runs[dtype] = read_metrics(out)
        assert [r["step"] for r in m] == list(range(1, 31))
        assert all(math.isfinite(v) for r in m for v in r["loss"].values()) and all(
            math.isfinite(r["grad_norm"]) for r in m
        )
        first, last = m[0]["loss"], m[-1]["loss"]
        assert set(first) == set(SIZES)
        for size in first:
            assert last[size] < first[size] - 0.5, (dtype, size, first[size], last[size])
        assert all(math.isfinite(v) for v in m[-1]["val_loss"].values())
        weights = ck.load_tensors(out / ck.WEIGHTS)
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
        model = ck.load_model(out, DEVICE)
        with torch.no_grad():
            assert torch.isfinite(model(torch.zeros(1, 8, dtype=torch.long, device=DEVICE))).all()
    a, b = runs["fp32"][0]["loss"], runs["bf16"][0]["loss"]
    assert a != b and all(abs(a[s] - b[s]) < 0.05 for s in a), (a, b)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_on_cuda_continues_the_uninterrupted_run(tmp_path, dtype):
    """Halted after step 4's checkpoint and resumed: steps 5..8 have the uninterrupted run's losses and end at its
    weights (optimizer moments and step counts restored onto the GPU, fused AdamW included). The math attention
    kernel has a deterministic backward, so the two runs can agree to rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tcfg = lambda: tiny_train_config(steps=8, save_every=4, dtype=dtype)
    full, halted = tmp_path / "full", tmp_path / "halted"
    with sdpa_kernel(SDPBackend.MATH):
        train(tiny_config(), tcfg(), full, device=DEVICE)
        train(tiny_config(), tcfg(), halted, device=DEVICE, halt_after=4)
        assert len(read_metrics(halted)) == 4
        train(tiny_config(), tcfg(), halted, device=DEVICE, resume=True)
    a, b = read_metrics(full), read_metrics(halted)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for size in ra["loss"]:
            assert rb["loss"][size] == pytest.approx(ra["loss"][size], rel=1e-5, abs=1e-5), (ra["step"], size)
    wa, wb = ck.load_tensors(full / ck.WEIGHTS), ck.load_tensors(halted / ck.WEIGHTS)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


# ---------------------------------------------------------------- FSDP2 in one process, NCCL


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    """A subprocess that imports this checkout's matryoshka_lm, whether installed or not."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS.parent / "src"), env.get("PYTHONPATH")) if p)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]


def test_fsdp_in_one_process_on_nccl_shards_and_matches_the_unsharded_model():
    """tests/_fsdp_one_process.py under torchrun: an NCCL group of one, every parameter a DTensor, three steps with
    fused AdamW equal to the unsharded model's, losses and weights."""
    r = run([*TORCHRUN, str(TESTS / "_fsdp_one_process.py"), DEVICE])
    assert "OK nccl" in r.stdout.splitlines(), r.stdout[-2000:]


def test_cli_train_with_fsdp_in_one_process_on_cuda_matches_the_plain_run(tmp_path):
    """`matryoshka train --fsdp --device cuda` under torchrun with one process exits 0, and its losses and its
    checkpoint (which loads) match the same run without torchrun or FSDP."""
    common = ["train", "--preset", "tiny", "--steps", "4", "--batch-size", "8", "--max-corpus-chars", "60000"]
    common += ["--dtype", "fp32", "--device", DEVICE, "--quiet"]
    plain, sharded = tmp_path / "plain", tmp_path / "fsdp"
    run([sys.executable, "-m", "matryoshka_lm.cli", *common, "--out", str(plain)])
    run([*TORCHRUN, "-m", "matryoshka_lm.cli", *common, "--fsdp", "--out", str(sharded)])
    a, b = read_metrics(plain), read_metrics(sharded)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["loss"].keys() == rb["loss"].keys()
        for size in ra["loss"]:
            assert abs(ra["loss"][size] - rb["loss"][size]) < 1e-3, (ra["step"], size, ra["loss"], rb["loss"])
    assert ck.read_config(sharded)[1].fsdp and not ck.read_config(plain)[1].fsdp
    ma, mb = ck.load_model(plain, DEVICE), ck.load_model(sharded, DEVICE)
    for (name, p), q in zip(ma.state_dict().items(), mb.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=name)
