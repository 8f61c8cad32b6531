"""Table 3 where students run: a fine-tuned teacher and student, each in PyTorch fp32, ONNX fp32 and ONNX int8 on
this machine's CPU (batch-1 latency over the dev set, median and p95; batch-32 throughput; dev score of each
form), through the real commands: `distil finetune ... save_models=true`, then `distil export`.

Models, one of:
  --quickstart DIR   a `distil quickstart` output (its pretrained teacher/export and student/export and its
                     sample task from real text); run `distil quickstart --output DIR` first
  --base-shapes      a BERT-base-shaped teacher (12 x 768, FFN 3072) and a 6-layer DistilBERT student built
                     from it as the recipe does, randomly initialised (no hub here): real sizes for timing,
                     scores only as good as a brief fine-tuning from scratch makes them
Both fine-tune on the quickstart's sample task (is this sentence the first of its paragraph?), written from
the standard library's docstrings when --quickstart is not given.

    python benchmarks/bench_export.py --quickstart quickstart --work /tmp/bench-export
    python benchmarks/bench_export.py --base-shapes --work /tmp/bench-export-base --epochs 1
Prints the table (speed-up of each form against the teacher in eager PyTorch fp32 at batch 1) and writes
--out JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distil_cli import run_distil  # noqa: E402 - benchmarks/distil_cli.py, beside this script


def base_shapes(work: Path, task_train: Path) -> dict[str, Path]:
    """A BERT-base-shaped masked LM (random) with a WordPiece trained on the task's text, and its recipe student."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from distil.data_pipeline.prepare.tokenize import train_wordpiece
    from distil.pretrain.config import StudentConfig
    from distil.pretrain.models import build_student

    lines = [line.split("\t")[0] for line in task_train.read_text().splitlines()[1:]]
    tokenizer = train_wordpiece(lambda: [lines], 8000)
    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                         max_position_embeddings=512))
    student, _ = build_student(teacher, StudentConfig())
    out = {}
    for name, model in (("teacher", teacher), ("student", student)):
        folder = work / "models" / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[name] = folder
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--quickstart", type=Path, help="a distil quickstart output folder")
    source.add_argument("--base-shapes", action="store_true", help="random BERT-base teacher + recipe student")
    p.add_argument("--work", type=Path, required=True, help="folder for fine-tunings and exports (replaced)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-train", type=int, default=1200)
    p.add_argument("--n-dev", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()

    import shutil

    from distil.pretrain.finetune.sample_task import write_opening_sentence_task

    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    if args.quickstart:
        corpus = args.quickstart / "corpus.txt"
        models = {"teacher": args.quickstart / "teacher" / "export", "student": args.quickstart / "student" / "export"}
        for folder in (corpus, *models.values()):
            if not folder.exists():
                sys.exit(f"--quickstart {args.quickstart}: {folder} is missing; run distil quickstart --output "
                         f"{args.quickstart} first")
    else:
        from distil.data_pipeline.prepare.sample_corpus import write_sample_corpus

        corpus = args.work / "corpus.txt"
        write_sample_corpus(corpus)
    task = write_opening_sentence_task(corpus, args.work / "task", n_train=args.n_train, n_dev=args.n_dev)
    if args.base_shapes:
        models = base_shapes(args.work, Path(task["train"]))
    store = f"sqlite:///{args.work / 'mlflow.db'}"
    reports = {}
    for role, folder in models.items():
        out = args.work / "finetune" / role
        run_distil(["finetune", "--model", str(folder), "--task", "custom", "--train", str(task["train"]), "--dev",
             str(task["dev"]), "--output", str(out), "--seeds", "1", "--epochs", str(args.epochs), "--lr", "5e-4",
             "--batch-size", "16", "--max-seq-len", "48", "--tracking-uri", store, "--experiment", "bench-export",
             "warmup_ratio=0.1", "save_models=true", "inference=false"])
        run_distil(["export", "--model", str(out / "seed_42" / "model"), "--dev", str(task["dev"]), "--output",
             str(args.work / "onnx" / role), "--max-seq-len", "48", "--threads", str(args.threads),
             "--tracking-uri", store, "--experiment", "bench-export", "--max-score-drop", "100"])
        reports[role] = json.loads((args.work / "onnx" / role / "export_report.json").read_text())

    teacher_ms = reports["teacher"]["forms"]["pytorch-fp32"]["latency_ms_median"]
    rows = []
    for role, report in reports.items():
        for form in report["forms"].values():
            rows.append({"model": role, "params": report["num_parameters"], "form": form["form"],
                         "size_mb": form["size_bytes"] / 1e6, "score": 100 * form["score"],
                         "drop": form.get("score_drop_points"), "median_ms": form["latency_ms_median"],
                         "p95_ms": form["latency_ms_p95"], "per_s": form["throughput_per_s"],
                         "speedup_vs_teacher_eager": teacher_ms / form["latency_ms_median"]})
    meta = {"date_utc": reports["teacher"]["created"], "versions": reports["teacher"]["versions"],
            "cpu": reports["teacher"]["cpu"], "threads": args.threads, "dev_examples": reports["teacher"]["examples"],
            "models": "quickstart" if args.quickstart else "base-shapes", "epochs": args.epochs}
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(json.dumps(meta))
    print("| model | params | form | size MB | dev score | drop (points) | batch 1 median ms | p95 ms | "
          "batch 32 examples/s | speed-up vs teacher eager (batch 1) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        drop = "" if r["drop"] is None else f"{r['drop']:+.2f}"
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['form']} | {r['size_mb']:.1f} | {r['score']:.2f} | "
              f"{drop} | {r['median_ms']:.2f} | {r['p95_ms']:.2f} | {r['per_s']:.1f} | "
              f"{r['speedup_vs_teacher_eager']:.2f}x |")


if __name__ == "__main__":
    main()
