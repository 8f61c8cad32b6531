"""Self-attention relation loss (MiniLMv2): the plain form against the memory-lean one (one relation head at a
time, recomputed in the backward pass), forward + backward on CPU.

Memory is what autograd keeps for the backward pass: the bytes of every tensor saved by the forward (counted
once per storage, through torch.autograd.graph.saved_tensors_hooks), which is where the forms differ; the
inputs are excluded. Time is the median of --repeats forward + backward passes after one warm-up.

    python benchmarks/bench_layer_losses.py                       # B 8, L 128 and 512, R 12, 768 -> 384
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from distil.pretrain.layer_losses import relation_kl, relation_kl_lean


def saved_bytes(fn, *inputs) -> int:
    """Bytes autograd saves for the backward pass of fn(*inputs), each storage once, inputs excluded."""
    seen: dict[int, int] = {}
    excluded = {x.untyped_storage().data_ptr() for x in inputs}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    out.backward()
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lengths", default="128,512")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--teacher-width", type=int, default=768)
    p.add_argument("--student-width", type=int, default=384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator().manual_seed(0)
        teacher = torch.randn(args.batch, length, args.teacher_width, generator=g)
        mask = torch.ones(args.batch, length, dtype=torch.long)
        mask[:, int(0.9 * length):] = 0  # a tenth of padding
        for name, fn in (("plain", relation_kl), ("lean", relation_kl_lean)):
            student = torch.randn(args.batch, length, args.student_width, generator=g, requires_grad=True)

            def step(s=student, loss=fn, t=teacher, m=mask):
                return loss(s, t, m, args.heads)

            memory = saved_bytes(lambda *_: step(), student, teacher)
            times = []
            for i in range(args.repeats + 1):
                student.grad = None
                started = time.perf_counter()
                step().backward()
                if i:
                    times.append(time.perf_counter() - started)
            rows.append({"L": length, "form": name, "saved_mib": memory / 2**20,
                         "ms": 1000 * statistics.median(times)})
    print(json.dumps({"batch": args.batch, "heads": args.heads, "teacher_width": args.teacher_width,
                      "student_width": args.student_width, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))
    print("| L | form | saved for backward MiB | fwd+bwd ms (median) |")
    print("|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['L']} | {r['form']} | {r['saved_mib']:.1f} | {r['ms']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
