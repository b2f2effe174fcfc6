"""`matryoshka demo` end to end on a tiny random Llama (--hf instead of SmolLM2's GGUF): imported and quantized once,
every bit width from one resident copy, the speculative line lossless, a second run reusing the cache."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

pytest.importorskip("transformers")

from _tiny_ckpt import make_checkpoint  # noqa: E402
from _tiny_llama import tiny_llama  # noqa: E402
from matryoshka_lm.cli import main  # noqa: E402

pytestmark = pytest.mark.slow  # an end-to-end pipeline (still run by `make test`)


def test_the_demo_serves_every_bit_width_from_one_copy(tmp_path, corpus_file, capsys):
    hf = tmp_path / "llama"
    # widths that split into quantization groups of 32 (SmolLM2's do: 576, 1536, 9 x 64)
    tiny_llama(hf, make_checkpoint(tmp_path / "ckpt", corpus_file), hidden_size=64, intermediate_size=128, head_dim=16,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    out = tmp_path / "demo"
    args = ["demo", "--hf", str(hf), "--out", str(out), "--limit", "2", "--tokens", "4", "--draft", "XL@int3"]
    main(args)
    printed = capsys.readouterr().out
    res = json.loads((out / "demo.json").read_text())
    cells = [r["cell"] for r in res["rows"]]
    assert cells == [f"XL@int{b}" for b in (8, 6, 4, 3, 2)] + ["L@int8", "M@int8"]
    assert all(math.isfinite(r["bpb"]) and r["bpb"] > 0 and r["tok_s"] > 0 for r in res["rows"])
    # the bytes each cell reads shrink with its bits (int3 reads int4's planes); one copy holds them all
    mb = [r["mb_per_token"] for r in res["rows"]]
    assert mb[0] > mb[1] > mb[2] == mb[3] > mb[4] and mb[0] > mb[5] > mb[6]
    assert res["bytes"]["planes"] <= 1.05 * res["bytes"]["stored"]
    assert res["speculative"]["same"] and res["speculative"]["draft"] == "XL@int3"
    assert "XL@int2" in printed and "not fine-tuned" in printed and "speculative: XL@int8 drafted by XL@int3" in printed
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    main(args)  # cached: nothing is converted again
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in stamp and p.is_dir()} == {
        k: v for k, v in stamp.items() if (out / k).is_dir()
    }
