"""ONNX for the student: export with torch's exporter, int8 / fp16 conversion with ONNX Runtime's tools, and one
calling convention for every form (PyTorch or an ONNX Runtime session: a batch of numpy arrays in, logits
out), so that verification and timing treat the forms alike.

The exporter and runtime are the `export` extra (onnx, onnxscript, onnxruntime); `require_extra` says so in
one line when they are missing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distil.common.errors import UserError

MIN_OPSET = 18  # torch's exporter (torch.export + onnxscript) writes opset 18 and later
EXTRA = "export"


def require_extra() -> None:
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(f"distil export needs {', '.join(missing)}: install the extra with "
                        f"pip install 'distil[{EXTRA}]' (scripts/setup.sh installs it)")


def check_opset(opset: int) -> None:
    """An opset torch's exporter writes and the installed onnx knows; whether the installed onnxruntime runs
    it is known when it loads the model (onnx_runner says so)."""
    import onnx

    top = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= top:
        raise UserError(f"--opset {opset}: torch's exporter writes opset {MIN_OPSET} or later and the installed onnx "
                        f"{onnx.__version__} knows up to {top}; choose {MIN_OPSET}..{top}")


def output_names(model: torch.nn.Module) -> list[str]:
    """The model's outputs as the ONNX file names them: start_logits and end_logits for question answering (as
    transformers' QA models and ONNX Runtime's loaders call them), else logits."""
    return ["start_logits", "end_logits"] if type(model).__name__.endswith("ForQuestionAnswering") else ["logits"]


def model_output(model: torch.nn.Module, out) -> torch.Tensor:
    """One array per batch for every form: QA's start and end logits stacked on a last axis of 2."""
    if type(model).__name__.endswith("ForQuestionAnswering"):
        return torch.stack([out.start_logits, out.end_logits], -1)
    return out.logits


def export_onnx(model: torch.nn.Module, sample: dict[str, torch.Tensor], path: Path, opset: int) -> None:
    """`model` (eval, fp32, CPU) to `path`, inputs and outputs named, batch and sequence axes dynamic."""
    import logging
    import warnings

    batch = torch.export.Dim("batch", min=1, max=4096)
    sequence = torch.export.Dim("sequence", min=2, max=8192)
    names = list(sample)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (), kwargs=sample, dynamo=True, opset_version=opset,
                                        input_names=names, output_names=output_names(model), verbose=False,
                                        dynamic_shapes={name: {0: batch, 1: sequence} for name in names})
    except Exception as error:  # noqa: BLE001 - the exporter raises many types; one line names the model
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise UserError(f"torch's ONNX exporter could not export this {type(model).__name__}: {first}") from None
    finally:
        quiet.setLevel(level)
    program.save(str(path))


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantization (weights int8, activations quantized at run time): ONNX Runtime's CPU form."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "consider pre-processing": not needed for dynamic quantization of MatMuls
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def convert_fp16(source: Path, target: Path) -> None:
    """Weights and compute in fp16, inputs and outputs kept as they are (for a GPU execution provider)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(target))


Batch = dict[str, np.ndarray]
Runner = Callable[[Batch], np.ndarray]


def onnx_runner(path: Path, threads: int | None, provider: str = "CPUExecutionProvider") -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=[provider])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(error).strip().splitlines()[0][:300]
        hint = "; choose a lower --opset" if "opset" in first.lower() else ""
        raise UserError(f"onnxruntime {onnxruntime.__version__} cannot load the exported {path.name}: "
                        f"{first}{hint}") from None
    inputs = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]

    def run(batch: Batch) -> np.ndarray:
        values = session.run(outputs, {k: v for k, v in batch.items() if k in inputs})
        return values[0] if len(values) == 1 else np.stack(values, -1)  # QA: start and end, as model_output

    return run


def torch_runner(model: torch.nn.Module) -> Runner:
    @torch.inference_mode()
    def run(batch: Batch) -> np.ndarray:
        return model_output(model, model(**{k: torch.from_numpy(v) for k, v in batch.items()})).float().numpy()

    return run


@dataclass
class Timing:
    latency_ms_median: float
    latency_ms_p95: float
    latency_examples: int
    throughput_per_s: float
    throughput_batch: int


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def time_runner(run: Runner, singles: list[Batch], batches: list[Batch], examples: int) -> Timing:
    """Latency at batch 1: every single-example batch once (after one warm-up), median and p95; throughput:
    the batched pass over the same examples. Inputs are tokenised and padded beforehand: tokenisation is
    not timed."""
    run(singles[0])
    latencies = []
    for batch in singles:
        started = time.perf_counter()
        run(batch)
        latencies.append((time.perf_counter() - started) * 1000.0)
    run(batches[0])
    started = time.perf_counter()
    for batch in batches:
        run(batch)
    seconds = time.perf_counter() - started
    size = next(iter(batches[0].values())).shape[0]
    return Timing(statistics.median(latencies), percentile(latencies, 0.95), len(singles),
                  examples / seconds if seconds > 0 else float("nan"), size)


def size_on_disk(paths: Sequence[Path]) -> int:
    return int(sum(p.stat().st_size for p in paths if p.is_file()))

