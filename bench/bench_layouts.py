"""CPU weight layouts for the GPT decode step: time of one step's GEMMs at M = 1, 2, 4, 8 rows, and
whether a row's result depends on how many rows share the call.

    python bench/bench_layouts.py --threads 2 [--layers 24 --repeat 7]

The weights are the IndexTTS-2 GPT's decode-step matrices with random values (per layer c_attn
1280×3840, attn c_proj 1280×1280, c_fc 1280×5120, mlp c_proj 5120×1280, then mel_head 1280×8194):
1.93 GB in float32 for 24 layers, far beyond any cache, so each step reads them from memory.
Layouts: `in_out` is HF Conv1D's [in, out] with `addmm(b, x, W)` (the GPT-2 blocks as stored);
`out_in` is nn.Linear's [out, in] with `F.linear`; `onednn` is oneDNN's packed weight
(`mkldnn._reorder_linear_weight`, no batch-size hint) with `mkldnn._linear_pointwise`; `rowwise`
is `in_out` called once per row (what DecodeBatch does on CPU). `identical` says whether every
row of an M-row call equals, bit for bit, the same row computed alone (M = 1), for M = 2..8."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

D = 1280  # gpt.model_dim
SHAPES = [(D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)]  # (in, out) of one GPT-2 block's Conv1D weights
MEL_CODES = 8194  # gpt.number_mel_codes: mel_head out-features
Linear = Callable[[Tensor], Tensor]


def build(layout: str, w_io: Tensor, b: Tensor) -> Linear:
    """y = x·W + b for x [M, in] with W kept in `layout`."""
    if layout in ("in_out", "rowwise"):
        w = w_io.contiguous()
        if layout == "in_out":
            return lambda x: torch.addmm(b, x, w)
        return lambda x: torch.cat([torch.addmm(b, x[r : r + 1], w) for r in range(x.size(0))])
    w_oi = w_io.t().contiguous()
    if layout == "out_in":
        return lambda x: F.linear(x, w_oi, b)
    if layout == "onednn":
        packed = torch.ops.mkldnn._reorder_linear_weight(w_oi, None)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
    raise ValueError(layout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", default="in_out,out_in,onednn,rowwise")
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--layers", type=int, default=24, help="GPT-2 blocks (24 in IndexTTS-2)")
    ap.add_argument("--repeat", type=int, default=7, help="timed steps per layout and M (min and median shown)")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    shapes = SHAPES * args.layers + [(D, MEL_CODES)]
    gb = sum(i * o for i, o in shapes) * 4 / 1e9
    rows = [int(m) for m in args.rows.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(shapes)} matrices, {gb:.2f} GB fp32")
    print("| layout | " + " | ".join(f"M={m} ms (min/median)" for m in rows) + " | identical |")
    print("|---|" + "---|" * (len(rows) + 1))
    for layout in args.layouts.split(","):
        weights = [(torch.randn(i, o, generator=gen) * 0.02, torch.randn(o, generator=gen) * 0.02) for i, o in shapes]
        fns = [(w.size(0), build(layout, w, b)) for w, b in weights]
        del weights
        with torch.inference_mode():
            k, f = fns[0]
            x = torch.randn(8, k, generator=gen)
            alone = torch.cat([f(x[r : r + 1]) for r in range(8)])
            identical = all(torch.equal(f(x[:m]), alone[:m]) for m in range(2, 9))
            cells = []
            for m in rows:
                xs = {i: torch.randn(m, i, generator=gen) for i, _ in shapes}
                for i, fn in fns:  # warm-up step
                    fn(xs[i])
                times = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    for i, fn in fns:
                        fn(xs[i])
                    times.append(1000 * (time.perf_counter() - t0))
                cells.append(f"{min(times):.0f} / {statistics.median(times):.0f}")
        print(f"| {layout} | " + " | ".join(cells) + f" | {'yes' if identical else 'no'} |")
        del fns
    return 0


if __name__ == "__main__":
    sys.exit(main())
