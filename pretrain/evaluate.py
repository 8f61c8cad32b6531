"""`distil evaluate`: held-out masked-LM metrics of a teacher and its students, as MLflow runs.

Every model sees exactly the same masked batches: the held-out split is streamed once with a fixed seed and
each batch goes through every model before the next one is read (so nothing has to be kept in memory, and
the teacher's distribution is at hand for KL(teacher || student) without storing logits).

Per model: masked-LM loss (mean cross-entropy over the masked positions), perplexity (exp of it), top-1 /
top-5 accuracy on the masked positions, parameter count and measured inference throughput (non-padding
tokens per second of forward time, the first batch left out as warm-up when there are more); with a teacher:
KL(teacher || student) at temperature 1 averaged over the masked positions, and top-1 agreement with it.
Which tokens are masked follows --mask-smoothing: the recipe's count^-0.7 weighting by default (mostly rare
tokens, hard to predict: losses read higher), 0 for BERT's uniform choice.

MLflow (unless --no-tracking): one parent run for the evaluation (its settings as params, the JSON report as
artifact `eval/report.json`) and one child run per model (tag `mlflow.parentRunId`, param `mode=eval`,
metrics `eval_mlm_loss`, `eval_perplexity`, `eval_top1_accuracy`, ...), so `distil review` lists one row per
evaluated model with its eval* columns. The store is chosen as for training (pretrain.tracking).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import torch
import torch.nn.functional as F

from distil.common.errors import UserError
from distil.common.files import atomic_write_json
from distil.data_pipeline.manifest import Manifest

DEFAULT_STORE_RUN_DIR = Path("runs") / "evaluate"  # default store: runs/mlflow.db, as `distil train` and review
METRIC_NAMES = ("mlm_loss", "perplexity", "top1_accuracy", "top5_accuracy", "tokens_per_s", "kl_from_teacher",
                "teacher_agreement")


@dataclass
class ModelResult:
    """What the report holds for one model."""

    name: str
    path: str
    role: str  # "teacher" or "student"
    model_type: str
    num_parameters: int
    mlm_loss: float
    perplexity: float
    top1_accuracy: float
    top5_accuracy: float
    masked_tokens: int
    tokens: int
    forward_seconds: float
    tokens_per_s: float | None
    kl_from_teacher: float | None = None
    teacher_agreement: float | None = None


class _Tally:
    """Running sums over the masked positions of one model."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.top1 = 0
        self.top5 = 0
        self.masked = 0
        self.kl_sum = 0.0
        self.agree = 0
        self.tokens = 0
        self.timed_tokens = 0
        self.timed_seconds = 0.0
        self.seconds = 0.0


# ----------------------------------------------------------------------------------------------------------
# loading and checking


def model_name(path: str, taken: set[str]) -> str:
    """A short unique name: the folder name, or its parent's for a run's `export/` folder."""
    p = Path(path)
    base = p.parent.name if p.name == "export" and p.parent.name else p.name or str(p)
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def load_model(path: str, manifest: Manifest, device: torch.device) -> torch.nn.Module:
    """An exported HF masked-LM folder, checked against the shards, in eval mode on `device`."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"--model/--teacher {path}: no such folder (give a model folder exported by distil train)")
    if not (folder / "config.json").is_file():
        raise UserError(f"{path} has no config.json: give a folder saved with save_pretrained (a run's export/)")
    try:
        config = AutoConfig.from_pretrained(str(folder))
        model, info = AutoModelForMaskedLM.from_pretrained(str(folder), output_loading_info=True)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"{path} is not a masked-LM model folder ({config_type(folder)}): {first}") from None
    missing = info.get("missing_keys") or []
    if missing:
        raise UserError(f"{path} has no trained masked-LM head or weights (missing {sorted(missing)[0]}, ...): "
                        "give a BertForMaskedLM / DistilBertForMaskedLM export")
    check_against_manifest(path, config, manifest)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def config_type(folder: Path) -> str:
    try:
        return "model_type " + repr(json.loads((folder / "config.json").read_text()).get("model_type"))
    except (OSError, ValueError):
        return "unreadable config.json"


def check_against_manifest(path: str, config: Any, manifest: Manifest) -> None:
    """Vocabulary, special tokens and positions must match the shards (else garbage or an index error)."""
    if config.vocab_size != manifest.vocab_size:
        raise UserError(f"{path}: vocab_size {config.vocab_size} != the shards' {manifest.vocab_size}; evaluate on "
                        "shards prepared with this model's tokenizer (distil prepare --tokenizer <model dir>)")
    pad = getattr(config, "pad_token_id", None)
    if pad is not None and pad != manifest.special_tokens.pad:
        raise UserError(f"{path}: pad_token_id {pad} != the shards' pad id {manifest.special_tokens.pad}; the "
                        "shards were tokenised with another tokenizer")
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and max_pos < manifest.max_len:
        raise UserError(f"{path}: max_position_embeddings {max_pos} < the shards' max_len {manifest.max_len}; "
                        "prepare the shards with a smaller --max-seq-len")
    tokenizer_ids = tokenizer_special_ids(path)
    shards_ids = asdict(manifest.special_tokens)
    diff = {k: (v, shards_ids[k]) for k, v in tokenizer_ids.items() if shards_ids.get(k) != v}
    if diff:
        raise UserError(f"{path}: tokenizer special token ids differ from the shards' (model, shards): {diff}; "
                        "evaluate on shards prepared with this model's tokenizer")


def tokenizer_special_ids(path: str) -> dict[str, int]:
    """Special token ids of the tokenizer saved beside the model; {} when there is none."""
    if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        return {}
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return {}
    ids = {"pad": tok.pad_token_id, "cls": tok.cls_token_id, "sep": tok.sep_token_id, "mask": tok.mask_token_id,
           "unk": tok.unk_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def holdout_stream(shards: str, batch_size: int, seed: int, mask_smoothing: float = 0.7):
    from distil.data_pipeline.masking import MaskingConfig
    from distil.data_pipeline.stream import PretrainStream

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be >= 1")
    if mask_smoothing < 0:
        raise UserError(f"--mask-smoothing {mask_smoothing} must be >= 0 (0: uniform, as BERT; 0.7: the recipe's)")
    return PretrainStream(shards, split="holdout", batch_size=batch_size,
                          masking=MaskingConfig(smoothing=mask_smoothing), seed=seed, num_workers=0)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------------------
# the evaluation loop


def masked_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], positions: torch.Tensor,
                  device: torch.device) -> tuple[torch.Tensor, float]:
    """fp32 logits at the masked positions [M, V] and the forward time in seconds (device synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return logits[positions].float(), seconds


def score(tally: _Tally, logits: torch.Tensor, targets: torch.Tensor, teacher_log_probs: torch.Tensor | None,
          teacher_top1: torch.Tensor | None) -> None:
    tally.loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    tally.top1 += (top5[:, 0] == targets).sum().item()
    tally.top5 += (top5 == targets[:, None]).any(dim=-1).sum().item()
    tally.masked += targets.numel()
    if teacher_log_probs is not None:
        log_probs = F.log_softmax(logits, dim=-1)
        tally.kl_sum += F.kl_div(log_probs, teacher_log_probs, reduction="sum", log_target=True).item()
        tally.agree += (top5[:, 0] == teacher_top1).sum().item()


def run_evaluation(models: list[tuple[str, str, torch.nn.Module]], stream, device: torch.device,
                   max_batches: int | None, teacher_name: str | None,
                   progress: Any | None = None) -> tuple[list[ModelResult], dict[str, int]]:
    """models: (name, path, model); the teacher, if any, first. Every batch goes through every model."""
    tallies = {name: _Tally() for name, _, _ in models}
    counts = {"batches": 0, "sequences": 0, "tokens": 0, "masked_tokens": 0}
    with torch.inference_mode():
        for index, cpu_batch in enumerate(stream):
            if max_batches is not None and index >= max_batches:
                break
            batch = {k: v.to(device) for k, v in cpu_batch.items()}
            positions = batch["labels"] != -100
            targets = batch["labels"][positions]
            tokens = int(cpu_batch["attention_mask"].sum())
            counts["batches"] += 1
            counts["sequences"] += int(cpu_batch["input_ids"].shape[0])
            counts["tokens"] += tokens
            counts["masked_tokens"] += int(targets.numel())
            teacher_log_probs = teacher_top1 = None
            for name, _, model in models:
                logits, seconds = masked_logits(model, batch, positions, device)
                tally = tallies[name]
                tally.tokens += tokens
                tally.seconds += seconds
                if index > 0:  # the first batch is warm-up (allocator, kernels) when more follow
                    tally.timed_tokens += tokens
                    tally.timed_seconds += seconds
                if name == teacher_name:
                    score(tally, logits, targets, None, None)
                    teacher_log_probs = F.log_softmax(logits, dim=-1)
                    teacher_top1 = logits.argmax(dim=-1)
                else:
                    score(tally, logits, targets, teacher_log_probs, teacher_top1)
            if progress is not None:
                progress()
    if counts["batches"] == 0:
        raise UserError("the held-out split gave no batches: re-run distil prepare with a larger --holdout-fraction")
    if counts["masked_tokens"] == 0:
        raise UserError("no masked tokens in the evaluated batches: raise --max-batches or --batch-size")
    return [result(name, path, model, tallies[name], teacher_name) for name, path, model in models], counts


def result(name: str, path: str, model: torch.nn.Module, t: _Tally, teacher_name: str | None) -> ModelResult:
    loss = t.loss_sum / t.masked
    seconds, tokens = (t.timed_seconds, t.timed_tokens) if t.timed_tokens else (t.seconds, t.tokens)
    is_student = teacher_name is not None and name != teacher_name
    return ModelResult(
        name=name, path=str(path), role="teacher" if name == teacher_name else "student",
        model_type=model.config.model_type, num_parameters=int(model.num_parameters()), mlm_loss=loss,
        perplexity=math.exp(loss) if loss < 700 else math.inf, top1_accuracy=t.top1 / t.masked,
        top5_accuracy=t.top5 / t.masked, masked_tokens=t.masked, tokens=t.tokens, forward_seconds=t.seconds,
        tokens_per_s=tokens / seconds if seconds > 0 else None,
        kl_from_teacher=t.kl_sum / t.masked if is_student else None,
        teacher_agreement=t.agree / t.masked if is_student else None)


# ----------------------------------------------------------------------------------------------------------
# output: table, report, MLflow


def print_table(results: list[ModelResult], counts: dict[str, int], device: torch.device) -> None:
    from rich.console import Console
    from rich.table import Table

    from distil.pretrain.review import _fmt, _fmt_params

    table = Table(title=f"held-out masked LM: {counts['batches']} batches, {counts['masked_tokens']:,} masked "
                        f"tokens, {device.type}")
    for column in ("model", "role", "params", "loss", "ppl", "top-1", "top-5", "KL(t||s)", "agree", "tokens/s"):
        table.add_column(column, justify="left" if column in ("model", "role") else "right")
    for r in results:
        table.add_row(r.name, r.role, _fmt_params(r.num_parameters), _fmt(r.mlm_loss), _fmt(r.perplexity),
                      _fmt(r.top1_accuracy, ".3f"), _fmt(r.top5_accuracy, ".3f"), _fmt(r.kl_from_teacher),
                      _fmt(r.teacher_agreement, ".3f"), _fmt(r.tokens_per_s, ",.0f"))
    Console(width=max(130, Console().width)).print(table)


def eval_metrics(r: ModelResult) -> dict[str, float]:
    """The model's MLflow metrics: eval_<name>, so `distil review` shows them as columns."""
    values = {name: getattr(r, name) for name in METRIC_NAMES}
    return {f"eval_{k}": float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


def tracking_config(tracking_uri: str | None, experiment: str, run_name: str | None = None):
    """The tracker settings of an evaluation run (no system metrics, no model registration), validated."""
    from distil.pretrain.tracking import TrackingConfig

    cfg = TrackingConfig(tracking_uri=tracking_uri, experiment=experiment, run_name=run_name,
                         registered_model_name=None, system_metrics=False, start_timeout_s=10.0, finish_timeout_s=120.0,
                         finish_offline_wait_s=3.0)
    try:
        cfg.validate()
    except UserError as error:
        raise UserError(str(error).replace("tracking.tracking_uri", "--tracking-uri")
                        .replace("tracking.experiment", "--experiment")) from None
    return cfg


def track(report: dict[str, Any], report_path: Path, results: list[ModelResult], tracking_uri: str | None,
          experiment: str) -> None:
    """Parent run (settings, report artifact) + one child run per model. Never raises for tracking trouble:
    the tracker logs a warning and evaluation results stay in the report."""
    from distil.pretrain.tracking import create_tracker

    def tracker_for(run_name: str):
        cfg = tracking_config(tracking_uri, experiment, run_name)
        return create_tracker(cfg, rank=0, local_rank=0, world_size=1, run_dir=str(DEFAULT_STORE_RUN_DIR))

    settings = {k: report[k] for k in ("shards", "split", "batch_size", "seed", "mask_smoothing", "max_batches",
                                       "device")}
    parent = tracker_for("evaluate")
    report["mlflow"] = {"experiment": experiment, "run_id": parent.run_id,
                        "child_run_ids": {}, "tracking_uri": getattr(parent, "_safe_uri", lambda: None)()}
    children = []
    if parent.run_id is None:  # tracking off, or the store did not answer: the report alone holds the results
        atomic_write_json(report_path, report)
        parent.finish("FINISHED")
        if type(parent).__name__ != "NullTracker":
            click.echo("MLflow did not answer: this evaluation is not tracked (the report has every result)",
                       err=True)
        return
    with tempfile.TemporaryDirectory(prefix="distil-eval-") as tmp:
        for r in results:
            child = tracker_for(f"eval-{r.name}")
            report["mlflow"]["child_run_ids"][r.name] = child.run_id
            tags = {"distil.num_parameters": str(r.num_parameters), "distil.eval.model_path": r.path,
                    "mlflow.parentRunId": parent.run_id}
            child.set_tags(tags)
            child.log_params({"mode": "eval", "eval.role": r.role, "eval.model_path": r.path,
                              "eval.model_type": r.model_type, "eval.teacher": report["teacher"] or "",
                              **{f"eval.{k}": v for k, v in settings.items()}})
            child.log_metrics(eval_metrics(r), step=0)
            children.append(child)
        atomic_write_json(report_path, report)  # now with the run ids
        artifact = Path(tmp) / "report.json"
        artifact.write_text(report_path.read_text())
        parent.log_params({"mode": "evaluate", "eval.models": ",".join(r.name for r in results),
                           "eval.teacher": report["teacher"] or "", **{f"eval.{k}": v for k, v in settings.items()}})
        parent.log_artifact(str(artifact), artifact_path="eval")
        for child in children:
            child.finish("FINISHED")
        parent.finish("FINISHED")  # waits until the artifact was sent, before the temp folder goes


def evaluate_models(model_paths: tuple[str, ...], shards: str, teacher: str | None, max_batches: int | None,
                    batch_size: int, seed: int, device_name: str,
                    mask_smoothing: float = 0.7) -> tuple[dict[str, Any], list[ModelResult]]:
    """Loads and checks every model, evaluates them on the same held-out batches; returns (report, results)."""
    if not model_paths and not teacher:
        raise UserError("give at least one --model (or --teacher) folder")
    if max_batches is not None and max_batches < 1:
        raise UserError(f"--max-batches {max_batches} must be >= 1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model otherwise
    device = pick_device(device_name)
    stream = holdout_stream(shards, batch_size, seed, mask_smoothing)
    taken: set[str] = set()
    entries = []
    teacher_name = None
    if teacher:
        teacher_name = model_name(teacher, taken)
        entries.append((teacher_name, teacher))
    entries += [(model_name(p, taken), p) for p in model_paths]
    loaded = [(name, path, load_model(path, stream.manifest, device)) for name, path in entries]
    total = min(stream.batches_per_epoch(), max_batches or stream.batches_per_epoch())
    from tqdm import tqdm

    with tqdm(total=total, desc="evaluate", unit="batch", leave=False, disable=None) as bar:
        results, counts = run_evaluation(loaded, stream, device, max_batches, teacher_name,
                                         progress=lambda: bar.update(1))
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "shards": str(shards), "split": "holdout",
        "batch_size": batch_size, "seed": seed, "mask_smoothing": mask_smoothing, "max_batches": max_batches,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "teacher": teacher_name, **counts,
        "models": [asdict(r) for r in results],
    }
    print_table(results, counts, device)
    return report, results


@click.command("evaluate")
@click.option("--model", "models", multiple=True, metavar="DIR",
              help="An exported masked-LM folder (a run's export/). Repeat for several.")
@click.option("--shards", required=True, metavar="SHARDS", help="Shard set made by distil prepare with a held-out split.")
@click.option("--teacher", metavar="DIR", help="Teacher folder: also evaluated, and students get KL + agreement.")
@click.option("--max-batches", type=int, help="Evaluate at most this many held-out batches (default: all).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the masks (same seed, same batches).")
@click.option("--mask-smoothing", type=float, default=0.7, show_default=True,
              help="Which tokens are masked: probability ~ count^-S (0.7: the recipe's, favouring rare tokens; "
                   "0: uniform, as BERT's own evaluation).")
@click.option("--device", "device_name", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--output", type=click.Path(dir_okay=False), default="eval_report.json", show_default=True,
              help="JSON report (written atomically).")
@click.option("--tracking-uri", help="MLflow store or server (default: MLFLOW_TRACKING_URI, else runs/mlflow.db).")
@click.option("--experiment", default="distil", show_default=True, help="MLflow experiment.")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
def evaluate(models: tuple[str, ...], shards: str, teacher: str | None, max_batches: int | None, batch_size: int,
             seed: int, mask_smoothing: float, device_name: str, output: str, tracking_uri: str | None,
             experiment: str, no_tracking: bool) -> None:
    """Held-out masked-LM loss, perplexity, top-1/5 accuracy, size and throughput of each model (with
    --teacher: KL(teacher||student) and top-1 agreement), as a table, a JSON report and MLflow runs."""
    if not no_tracking:
        tracking_config(tracking_uri, experiment)  # a bad URI fails before the models are run
    report, results = evaluate_models(models, shards, teacher, max_batches, batch_size, seed, device_name,
                                      mask_smoothing)
    report_path = Path(output)
    if no_tracking:
        report["mlflow"] = None
        atomic_write_json(report_path, report)
    else:
        track(report, report_path, results, tracking_uri, experiment)
    click.echo(f"report: {report_path}")
