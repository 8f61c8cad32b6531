"""The paper's Table 4 (ablation of the distillation objective) at the scale of a CPU: from one teacher and one
corpus, distil the five variants, fine-tune each on one labelled task with several seeds, and print each
variant's change against the triple loss beside the paper's.

    python benchmarks/bench_ablation.py                      # 8 minutes on 2 idle CPU cores (15 loaded)
    python benchmarks/bench_ablation.py --work /tmp/abl --reuse --seeds 5

Stages, each the real CLI or API: the sample corpus (standard-library docstrings) -> `distil prepare` (WordPiece
tokenizer) -> `distil train` in MLM mode (the quickstart's 4-layer teacher) -> five `distil train` students
(the quickstart's 2-layer student, same data order and steps, only the objective or initialisation differs)
-> the opening-sentence task (pretrain/finetune/sample_task.py) -> `distil finetune` of the teacher and of
every student, `--seeds` seeds each, median dev accuracy.

The paper measures the GLUE macro score of students of a 12-layer BERT after 90 hours on 8 GPUs; here the
teacher is trained for a few hundred steps on 3 MB, the students for a few hundred more, and the score is one
small task's accuracy. The figures say which of the paper's orderings this scale reproduces, not more; the
seed spread printed beside them says how much of a difference is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

# name -> (training overrides, the paper's Table 4 change of the GLUE macro score against the triple loss)
VARIANTS: dict[str, tuple[list[str], float]] = {
    "triple loss": ([], 0.0),
    "without L_ce (KL)": (["loss.alpha_ce=0"], -2.96),
    "without L_cos": (["loss.alpha_cos=0"], -1.46),
    "without L_mlm": (["loss.alpha_mlm=0"], -0.31),
    "triple loss, random init": (["student.init_from_teacher=false"], -3.69),
}


def run_cli(args: list[str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run([sys.executable, "-P", "-m", "distil.pretrain.cli", *args], stdout=handle,
                                stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"distil {args[0]} failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - started


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").replace("__", "_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_ablation"), help="working folder")
    parser.add_argument("--reuse", action="store_true", help="keep stages already done in --work")
    parser.add_argument("--corpus-mb", type=float, default=3.0)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=200)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--dev-examples", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.1,
                        help="linear warm-up (without it more seeds predicted one class throughout)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="16: in trials every seed learned; at 32 some predicted one class throughout")
    parser.add_argument("--max-seq-len", type=int, default=48)
    parser.add_argument("--with-teacher", action="store_true", help="fine-tune the teacher too (a reference row)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per process (1: steadiest on a shared machine; the comparison is relative)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the distil subprocesses
    torch.set_num_threads(args.threads)  # the fine-tunings, in this process

    from distil.data_pipeline.prepare.sample_corpus import write_sample_corpus
    from distil.pretrain.finetune.run import FinetuneConfig, finetune_run
    from distil.pretrain.finetune.sample_task import write_opening_sentence_task

    work = args.work.resolve()
    if work.exists() and not args.reuse:
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    off = ["tracking.enabled=false"]

    corpus = work / "corpus.txt"
    if not corpus.is_file():
        write_sample_corpus(corpus, max_bytes=int(args.corpus_mb * 1_000_000))
    shards = work / "shards"
    if not (shards / "manifest.json").is_file():
        timings["prepare"] = run_cli(["prepare", "--input", str(corpus), "--output", str(shards), "--train-tokenizer",
                                      "4000", "--max-seq-len", "128", "--holdout-fraction", "0.02", "--pack"],
                                     work / "logs" / "prepare.log")
    teacher = work / "teacher"
    if not (teacher / "export" / "config.json").is_file():
        timings["teacher"] = run_cli(["train", "--config", "quickstart_teacher", f"data.shards={shards}",
                                      f"run.output_dir={teacher}", f"run.max_steps={args.teacher_steps}", *off],
                                     work / "logs" / "teacher.log")
    students = {}
    for name, (overrides, _) in VARIANTS.items():
        folder = work / "students" / slug(name)
        students[name] = folder / "export"
        if not (folder / "export" / "config.json").is_file():
            timings[f"distil: {name}"] = run_cli(
                ["train", "--config", "quickstart_student", f"data.shards={shards}", f"teacher.path={teacher / 'export'}",
                 f"run.output_dir={folder}", f"run.max_steps={args.student_steps}", *overrides, *off],
                work / "logs" / f"student_{slug(name)}.log")
    task = write_opening_sentence_task(corpus, work / "task", n_train=args.train_examples, n_dev=args.dev_examples)

    results = {}
    models = [("teacher", teacher / "export")] if args.with_teacher else []
    for name, model in [*models, *students.items()]:
        t0 = time.perf_counter()
        report = finetune_run(FinetuneConfig(
            model=str(model), task="custom", train=str(task["train"]), dev=str(task["dev"]),
            output=str(work / "finetune" / slug(name)), seeds=args.seeds, epochs=args.epochs, lr=args.lr,
            warmup_ratio=args.warmup_ratio, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
            overwrite=True, tracking=False, inference_max_examples=200))
        timings[f"finetune: {name}"] = time.perf_counter() - t0
        scores = [s["dev"]["dev_score"] for s in report["seeds"]]
        counts = (report["data"]["train"]["examples"], report["data"]["dev"]["examples"])
        results[name] = {"median": report["median"]["dev_score"], "seeds": scores,
                         "num_parameters": report["num_parameters"], "inference": report["inference"]}

    dev_labels = [json.loads(line)["label"] for line in task["dev"].read_text().splitlines()]
    class_rates = [dev_labels.count(label) / len(dev_labels) for label in sorted(set(dev_labels))]
    base = results["triple loss"]["median"]
    print(f"\nTable 4 at small scale: opening-sentence task, dev accuracy x 100, median of {args.seeds} fine-tuning "
          f"seeds ({counts[0]} train / {counts[1]} dev sentences, {args.epochs} epochs, lr {args.lr:g}, batch "
          f"{args.batch_size}, warm-up {args.warmup_ratio:g}; one class throughout scores "
          f"{' or '.join(f'{100 * r:.2f}' for r in class_rates)})")
    header = f"{'variant':<28}{'accuracy':>9}{'seed range':>14}{'one class':>11}{'change':>9}{'paper':>8}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        change = "" if name == "teacher" else f"{100 * (r['median'] - base):+.2f}"
        paper = "" if name == "teacher" else f"{VARIANTS[name][1]:+.2f}"
        spread = f"{100 * min(r['seeds']):.1f}-{100 * max(r['seeds']):.1f}"
        # a seed whose accuracy is one class's rate predicted that class throughout: it never left the plateau
        r["seeds_one_class"] = sum(any(abs(score - rate) < 1e-9 for rate in class_rates) for score in r["seeds"])
        stuck = f"{r['seeds_one_class']}/{len(r['seeds'])}"
        print(f"{name:<28}{100 * r['median']:>9.2f}{spread:>14}{stuck:>11}{change:>9}{paper:>8}")
    if "teacher" in results:
        t_inf, s_inf = results["teacher"]["inference"], results["triple loss"]["inference"]
        print(f"\nTable 3 here: teacher {results['teacher']['num_parameters']:,} parameters, "
              f"{t_inf['seconds']:.2f} s for {t_inf['examples']} dev sentences at batch 1 ({t_inf['torch_threads']} "
              f"thread); student {results['triple loss']['num_parameters']:,} "
              f"({100 * results['triple loss']['num_parameters'] / results['teacher']['num_parameters']:.0f} %), "
              f"{s_inf['seconds']:.2f} s ({100 * s_inf['seconds'] / t_inf['seconds']:.0f} % of the teacher's time)")
    total = time.perf_counter() - started
    print("\nstage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {total:.0f} s")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpus": os.cpu_count(),
            "threads": args.threads, "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    (work / "ablation.json").write_text(json.dumps({"meta": meta, "results": results, "timings": timings,
                                                    "total_s": total}, indent=2))
    print(f"results: {work / 'ablation.json'}")
    spread = max(max(r["seeds"]) - min(r["seeds"]) for r in results.values())
    print(f"largest seed range of one model: {100 * spread:.1f} points: medians closer than that are not ordered "
          "by this run")


if __name__ == "__main__":
    main()
