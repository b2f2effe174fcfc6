"""Peak memory of `prepare` does not grow with the corpus: it streams a big text file in bounded batches."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import random, resource, sys
    from pathlib import Path
    import pydoc_data.topics
    from matryoshka_lm.data import train_tokenizer
    from matryoshka_lm.data.prepare import prepare

    mb, out = int(sys.argv[1]), Path(sys.argv[2])
    paras = "\\n\\n".join(pydoc_data.topics.topics.values()).split("\\n\\n")
    tok = out / "tok.json"
    tok.write_text(train_tokenizer(paras[:2000], 1024).to_str())
    rng = random.Random(0)
    with open(out / "big.txt", "w") as f:  # the test corpus repeated in varied order, written piece by piece
        n = 0
        while n < mb << 20:
            rng.shuffle(paras)
            block = "\\n\\n".join(paras)
            f.write(block)
            n += len(block)
    del block
    m = prepare(out / "big.txt", out / "data", tokenizer=tok, workers=1).manifest
    print(m["train_tokens"] + m["val_tokens"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """
)


def peak(mb: int, folder) -> tuple[int, int]:
    folder.mkdir()
    run = subprocess.run([sys.executable, "-c", PROBE, str(mb), str(folder)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    tokens, rss_mb = map(int, run.stdout.split())
    return tokens, rss_mb


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    small_tokens, small = peak(8, tmp_path / "small")
    big_tokens, big = peak(32, tmp_path / "big")
    assert big_tokens > 3.5 * small_tokens
    # 24 MB more text: holding it would add at least that (and its token ids several times more)
    assert big - small < 12, (small, big)
