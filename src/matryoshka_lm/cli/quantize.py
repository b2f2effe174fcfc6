"""`matryoshka quantize`: store a checkpoint as int8 codes whose top bits are its int4 and int2 models."""

from __future__ import annotations

import argparse
import sys

from .options import nonnegative_int, positive_int


def width_weights(text: str) -> dict[int, float]:
    """argparse type: '8:1,4:0.05,2:0.005' -> {8: 1.0, 4: 0.05, 2: 0.005}."""
    try:
        pairs = [p.split(":") for p in text.split(",") if p.strip()]
        return {int(b): float(w) for b, w in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"give bits:weight pairs such as 8:1,4:0.05, got {text!r}") from None


def cmd_quantize(a: argparse.Namespace) -> None:
    from matryoshka_lm.convert.calibrate import Calibration, read_report
    from matryoshka_lm.convert.quantize import quantize_checkpoint
    from matryoshka_lm.core import checkpoint as ck
    from matryoshka_lm.core import quant
    from matryoshka_lm.core.spec import size_names, uniform_spec

    cal = 0
    if a.calibrate:
        cal = Calibration(
            a.calibrate, a.calib_seq_len, a.calib_data, **({"weights": a.calib_weights} if a.calib_weights else {})
        )
    out = quantize_checkpoint(a.ckpt, a.out, a.group_size, a.embeddings, a.force, calibrate=cal)
    cfg, _ = ck.read_config(out)
    qcfg, bits = ck.read_quant(out)
    report = read_report(out)
    how = f"nested GPTQ on {report['tokens']:,} tokens in {report['seconds']:.0f} s" if report else "round-to-nearest"
    print(f"wrote {out}: int{bits} codes, groups of {qcfg.group_size or 'one row'}, {how}", file=sys.stderr)
    print("bytes of weights per cell (fp32 for reference):", file=sys.stderr)
    for name in size_names(cfg):
        spec = uniform_spec(cfg, name)
        cells = [("fp32", None)] + [(f"int{b}", b) for b in (8, 4, 2)]
        row = "  ".join(f"{label} {quant.weight_bytes(cfg, spec, b, qcfg) / 1e6:.2f} MB" for label, b in cells)
        print(f"  {name:>4}: {row}", file=sys.stderr)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser(
        "quantize",
        help="store a checkpoint as int8 codes (rounded, or calibrated); every size then also runs @int4, @int2, ...",
    )
    q.add_argument("ckpt")
    q.add_argument("-o", "--out", required=True, help="new checkpoint directory")
    q.add_argument(
        "--group-size",
        type=nonnegative_int,
        help="input features per scale (default: the training run's --quant-group, else 32; 0 = one per row)",
    )
    q.add_argument("--embeddings", action="store_true", help="quantize the token embedding (and LM head) too")
    q.add_argument(
        "--calibrate",
        type=nonnegative_int,
        default=0,
        metavar="N",
        help="choose the codes by nested GPTQ on N windows of the corpus's training split (e.g. 128; 0: rounding)",
    )
    q.add_argument("--calib-seq-len", type=positive_int, default=512, help="tokens per calibration window")
    q.add_argument("--calib-data", help="calibration corpus (a text file or folder; default: the built-in corpus)")
    q.add_argument(
        "--calib-weights",
        type=width_weights,
        help="how much each bit width's output error counts, as bits:weight (default 8:1,6:0.5,4:0.25,3:0.1,2:0.01;"
        " larger narrow weights trade int8 error for int4/int3/int2)",
    )
    q.add_argument("--force", action="store_true", help="replace --out if it exists")
    q.set_defaults(func=cmd_quantize)
