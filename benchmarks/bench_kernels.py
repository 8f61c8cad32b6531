"""Distillation loss over the vocabulary projection: forward + backward time and peak memory.

What is timed, per method, is one training step of the loss head: student logits = h @ W^T + b, teacher
logits from the teacher's hidden states (no grad), KL(T) * T^2 over the KL rows + masked-LM CE, then
backward to h, W and b. Methods:
  eager        the recipe's code (distiller.py): full logits, masked_select, KLDivLoss + CrossEntropyLoss
  compile      torch.compile of that same function
  ours         kernels.fused_linear_distillation_kl_ce (Triton on CUDA, the chunked torch form on CPU)
  liger        Liger-Kernel's kl_div + cross_entropy on full logits (only if liger-kernel is installed)

Peak memory is the extra memory one step needs beyond its inputs (which all methods share):
  CUDA  torch.cuda.max_memory_allocated() during the step minus memory_allocated() before it.
  CPU   each (method, N) runs in a fresh process. After the timed steps, glibc is told to return
        freed memory (malloc_trim) and to give every buffer of 64 KiB or more its own mmap
        (mallopt M_MMAP_THRESHOLD), so RSS follows the live tensors; the kernel's peak-RSS mark is
        reset (write "5" to /proc/self/clear_refs), and the figure is VmHWM after one more step minus
        VmRSS before it.
Time is the median of --repeats steps after --warmup steps (compile time excluded, reported apart),
with the allocator at its defaults. On CPU the process's CPU time (all threads) is reported too: on a
shared machine it is steadier than wall time.

    python benchmarks/bench_kernels.py                                # GPU: N = 4K, 16K, 64K; bf16
    python benchmarks/bench_kernels.py --device cpu --rows 4096 --dtype fp32 --methods eager,ours
    python benchmarks/bench_kernels.py --device cpu --tiny            # smoke test of the script
Figures: --out FILE.json and/or --markdown FILE.md. The table is printed last.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distil.kernels import fused_linear_distillation_kl_ce

TEMPERATURE = 2.0
ALPHA_KL = 5.0
ALPHA_CE = 2.0
LABEL_FRACTION = 0.15  # masked-LM targets on ~15 % of the rows, as in BERT masking
ALL_METHODS = ("eager", "compile", "ours", "liger")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@dataclasses.dataclass
class Inputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    teacher_bias: torch.Tensor
    labels: torch.Tensor
    kl_mask: torch.Tensor

    def clear_grads(self) -> None:
        for t in (self.hidden, self.weight, self.bias):
            t.grad = None


def make_inputs(rows: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device) -> Inputs:
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[torch.rand(rows, generator=gen) >= LABEL_FRACTION] = -100
    return Inputs(
        hidden=randn(rows, hidden).requires_grad_(),
        weight=randn(vocab, hidden, scale=hidden**-0.5).requires_grad_(),
        bias=randn(vocab, scale=0.1).requires_grad_(),
        teacher_hidden=randn(rows, hidden),
        teacher_weight=randn(vocab, hidden, scale=hidden**-0.5),
        teacher_bias=randn(vocab, scale=0.1),
        labels=labels.to(device),
        # Every row is in the KL (the recipe's default: all non-pad tokens, here already unpadded).
        kl_mask=torch.ones(rows, dtype=torch.bool, device=device),
    )


def recipe_loss(inp: Inputs) -> torch.Tensor:
    """distiller.py's step, restricted to the loss head (alpha_ce -> ALPHA_KL, alpha_mlm -> ALPHA_CE)."""
    s_logits = F.linear(inp.hidden, inp.weight, inp.bias)
    with torch.no_grad():
        t_logits = F.linear(inp.teacher_hidden, inp.teacher_weight, inp.teacher_bias)
    vocab = s_logits.size(-1)
    mask = inp.kl_mask.unsqueeze(-1).expand_as(s_logits)
    s_slct = torch.masked_select(s_logits, mask).view(-1, vocab)
    t_slct = torch.masked_select(t_logits, mask).view(-1, vocab)
    loss_kl = (
        nn.KLDivLoss(reduction="batchmean")(
            F.log_softmax(s_slct / TEMPERATURE, dim=-1), F.softmax(t_slct / TEMPERATURE, dim=-1)
        )
        * TEMPERATURE**2
    )
    loss_ce = nn.CrossEntropyLoss(ignore_index=-100)(s_logits, inp.labels)
    return ALPHA_KL * loss_kl + ALPHA_CE * loss_ce


def ours_loss(inp: Inputs, chunk_size: int | None) -> torch.Tensor:
    return fused_linear_distillation_kl_ce(
        inp.hidden, inp.weight, inp.bias, None, inp.labels, inp.kl_mask, TEMPERATURE, ALPHA_KL, ALPHA_CE,
        teacher_hidden=inp.teacher_hidden, teacher_weight=inp.teacher_weight, teacher_bias=inp.teacher_bias,
        chunk_size=chunk_size,
    ).loss  # fmt: skip


def liger_loss_fn() -> Callable[[Inputs], torch.Tensor] | None:
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except ImportError:
        return None
    kl_div = LigerKLDIVLoss(reduction="batchmean")
    cross_entropy = LigerCrossEntropyLoss(ignore_index=-100)

    def liger_loss(inp: Inputs) -> torch.Tensor:
        s_logits = F.linear(inp.hidden, inp.weight, inp.bias)
        with torch.no_grad():
            t_logits = F.linear(inp.teacher_hidden, inp.teacher_weight, inp.teacher_bias)
        s_slct, t_slct = s_logits[inp.kl_mask], t_logits[inp.kl_mask]
        loss_kl = (
            kl_div(F.log_softmax(s_slct / TEMPERATURE, dim=-1), F.softmax(t_slct / TEMPERATURE, dim=-1))
            * TEMPERATURE**2
        )
        return ALPHA_KL * loss_kl + ALPHA_CE * cross_entropy(s_logits, inp.labels)

    return liger_loss


def loss_fn(method: str, chunk_size: int | None) -> Callable[[Inputs], torch.Tensor] | None:
    if method == "eager":
        return recipe_loss
    if method == "compile":
        return torch.compile(recipe_loss)
    if method == "ours":
        return lambda inp: ours_loss(inp, chunk_size)
    if method == "liger":
        return liger_loss_fn()
    raise ValueError(method)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(fn: Callable[[Inputs], torch.Tensor], inp: Inputs) -> float:
    inp.clear_grads()
    loss = fn(inp)
    loss.backward()
    return float(loss.detach())


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn: Callable[[Inputs], torch.Tensor], inp: Inputs, device: torch.device) -> int:
    """Memory one step needs beyond what is allocated before it (see the module docstring)."""
    inp.clear_grads()
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(fn, inp)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    libc.mallopt(M_MMAP_THRESHOLD, 65536)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM (peak RSS) to the current RSS
    base_kib = _proc_status_kib("VmRSS")
    step(fn, inp)
    return (_proc_status_kib("VmHWM") - base_kib) * 1024


def measure(method: str, rows: int, args: argparse.Namespace) -> dict:
    """One (method, N) measurement in this process."""
    device = torch.device(args.device)
    row = {"method": method, "rows": rows}
    fn = loss_fn(method, args.chunk_size)
    if fn is None:
        return row | {"status": "not installed"}
    inp = make_inputs(rows, args.vocab, args.hidden, DTYPES[args.dtype], device)
    try:
        start = time.perf_counter()
        loss = step(fn, inp)  # first step: compiles (torch.compile, Triton) and warms caches
        sync(device)
        first_s = time.perf_counter() - start
        for _ in range(max(args.warmup - 1, 0)):
            step(fn, inp)
        times, cpu_times = [], []
        for _ in range(args.repeats):
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            step(fn, inp)
            sync(device)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        peak = peak_extra_bytes(fn, inp, device)
    except torch.OutOfMemoryError:
        return row | {"status": "out of memory"}
    return row | {
        "status": "ok",
        "loss": loss,
        "time_ms": 1000 * statistics.median(times),
        "times_ms": [1000 * t for t in times],
        "first_step_s": first_s,
        # CPU seconds of this process, all threads: on a shared CPU box it is steadier than wall time.
        "process_cpu_ms": 1000 * statistics.median(cpu_times),
        "peak_extra_mib": peak / 2**20,
    }


def measure_in_child(method: str, rows: int, args: argparse.Namespace) -> dict:
    """CPU: a fresh process per measurement, so RSS belongs to this method alone."""
    cmd = [sys.executable, __file__, "--child", method, "--rows", str(rows)]
    for name in ("device", "dtype", "vocab", "hidden", "warmup", "repeats"):
        cmd += [f"--{name}", str(getattr(args, name))]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"method": method, "rows": rows, "status": f"failed: {tail[0][:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_ratios(results: list[dict]) -> None:
    eager = {r["rows"]: r for r in results if r["method"] == "eager" and r["status"] == "ok"}
    for r in results:
        base = eager.get(r["rows"])
        if r["status"] == "ok" and base is not None:
            r["speedup_vs_eager"] = base["time_ms"] / r["time_ms"]
            r["cpu_time_ratio_vs_eager"] = base["process_cpu_ms"] / max(r["process_cpu_ms"], 1e-9)
            r["memory_ratio_vs_eager"] = base["peak_extra_mib"] / max(r["peak_extra_mib"], 1e-9)
            r["loss_rel_diff_vs_eager"] = abs(r["loss"] - base["loss"]) / abs(base["loss"])


def table(results: list[dict], with_cpu_time: bool) -> str:
    cpu_head = " process CPU ms | CPU time vs eager |" if with_cpu_time else ""
    head = (
        "| method | N | fwd+bwd ms (median) | peak extra MiB | speed-up vs eager | memory / eager |"
        + cpu_head
        + " loss rel. diff vs eager |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if with_cpu_time else "") + "---:|"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['rows']} | {r['status']} |" + " |" * (head.count("|") - 4))
            continue
        cells = [
            r["method"],
            str(r["rows"]),
            f"{r['time_ms']:.1f}",
            f"{r['peak_extra_mib']:.0f}",
            f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else "",
            f"1/{r['memory_ratio_vs_eager']:.1f}" if "memory_ratio_vs_eager" in r else "",
        ]
        if with_cpu_time:
            cells += [
                f"{r['process_cpu_ms']:.1f}",
                f"{r['cpu_time_ratio_vs_eager']:.2f}x" if "cpu_time_ratio_vs_eager" in r else "",
            ]
        cells.append(f"{r['loss_rel_diff_vs_eager']:.1e}" if "loss_rel_diff_vs_eager" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("triton", "liger_kernel"):
        try:
            versions[package] = __import__(package).__version__
        except (ImportError, AttributeError):
            versions[package] = None
    return {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": name,
        "versions": versions,
        "dtype": args.dtype,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "temperature": TEMPERATURE,
        "alpha_kl": ALPHA_KL,
        "alpha_ce": ALPHA_CE,
        "label_fraction": LABEL_FRACTION,
        "chunk_size": args.chunk_size,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "memory_method": (
            "torch.cuda.max_memory_allocated - memory_allocated before the step"
            if device.type == "cuda"
            else "fresh process per measurement; after the timed steps malloc_trim + mallopt(M_MMAP_THRESHOLD, "
            "64 KiB), VmHWM reset via /proc/self/clear_refs; VmHWM after one step - VmRSS before"
        ),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument(
        "--tiny", action="store_true", help="tiny shapes (N 64,128; V 1021; H 32; fp32) to smoke-test"
    )
    p.add_argument("--rows", default=None, help="comma-separated N (default 4096,16384,65536)")
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 (fp32 with --tiny)")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument(
        "--chunk-size", type=int, default=None, help="rows per chunk for ours (default: automatic)"
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="write figures as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="write the table as markdown here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.rows = args.rows or "64,128"
        args.vocab, args.hidden = 1021, 32
        args.dtype = args.dtype or "fp32"
    args.dtype = args.dtype or "bf16"
    args.rows_list = [int(n) for n in (args.rows or "4096,16384,65536").split(",")]
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.method_list) - set(ALL_METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {','.join(ALL_METHODS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(
            "--device cuda but no CUDA device is visible; use --device cpu (with --tiny for a smoke test)"
        )
    for path in (args.out, args.markdown):
        if path is not None and not path.parent.is_dir():
            p.error(f"output folder {path.parent} does not exist; create it or pick another --out/--markdown")
    return args


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child, args.rows_list[0], args)))
        return 0
    results = []
    for rows in args.rows_list:
        for method in args.method_list:
            if args.device == "cpu":
                result = measure_in_child(method, rows, args)
            else:
                result = measure(method, rows, args)
                torch.cuda.empty_cache()
            results.append(result)
            print(f"{method:>8} N={rows:<6} {result.get('status')} "
                  f"{result.get('time_ms', float('nan')):.1f} ms {result.get('peak_extra_mib', float('nan')):.0f} MiB",
                  file=sys.stderr, flush=True)  # fmt: skip
    add_ratios(results)
    meta = environment(args)
    rendered = table(results, with_cpu_time=args.device == "cpu")
    if args.out is not None:
        write_atomic(args.out, json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    if args.markdown is not None:
        header = (
            f"{meta['date_utc']}, {meta['device']}, {args.dtype}, V={args.vocab}, H={args.hidden}, "
            f"versions {meta['versions']}\n\n"
        )
        write_atomic(args.markdown, header + rendered + "\n")
    print(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
