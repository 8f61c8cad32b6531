"""The paper's Table 2 at small scale: does distilling again on the task (DistilBERT (D)) beat fine-tuning the
student alone, by more than the seed spread, on a question-answering set built from real text?

The set (SQuAD v1.1 JSON, written by this script) is cloze-style extractive QA over the quickstart's corpus
(the standard library's docstrings): the context is two consecutive sentences of a paragraph, the question
one of them with one word of four letters or more (not its first) replaced by "what", and the answer that
word where the context has it. Up to three questions per paragraph; train and dev from disjoint paragraphs.

Steps: `distil finetune --task squad` of the teacher (its median seed's model is the task teacher), then of
the student alone and of the student with `--distill-from` that teacher, with --seeds seeds each (same
seeds, same data). A difference of means "exceeds the seed spread" when it is larger than the sum of the two
standard deviations over seeds.

    python benchmarks/bench_task_distill.py --quickstart /tmp/qs --work /tmp/bench-task --seeds 3
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distil_cli import run_distil  # noqa: E402 - benchmarks/distil_cli.py, beside this script

WORD = re.compile(r"\b[A-Za-z]{4,}\b")


def cloze_set(corpus: Path, out: Path, n_train: int, n_dev: int, per_paragraph: int = 3,
              seed: int = 0) -> dict[str, Path]:
    """SQuAD v1.1 files of cloze questions over pairs of consecutive sentences of the corpus's paragraphs."""
    from distil.pretrain.finetune.sample_task import SENTENCE_END

    rng = random.Random(seed)
    paragraphs = []
    for number, paragraph in enumerate(corpus.read_text(encoding="utf-8").splitlines()):
        sentences = [s for s in SENTENCE_END.split(paragraph) if len(s.split()) >= 6]
        if len(sentences) < 2:
            continue
        items = []
        for k, i in enumerate(rng.sample(range(len(sentences)), min(per_paragraph, len(sentences)))):
            j = i + 1 if i + 1 < len(sentences) else i - 1  # a neighbouring sentence, in the paragraph's order
            context = sentences[min(i, j)] + " " + sentences[max(i, j)]
            at = context.find(sentences[i]) if i < j else context.rfind(sentences[i])
            words = [m for m in WORD.finditer(sentences[i]) if m.start() > 0]
            if not words:
                continue
            word = rng.choice(words)
            question = sentences[i][:word.start()] + "what" + sentences[i][word.end():]
            items.append({"context": context, "qas": [{"id": f"p{number}q{k}", "question": question, "answers": [
                {"text": word.group(), "answer_start": at + word.start()}]}]})
        paragraphs.append(items)
    rng.shuffle(paragraphs)
    dev, train = [], []
    for items in paragraphs:  # whole paragraphs to one side: no context is shared between train and dev
        (dev if len(dev) < n_dev else train).extend(items)
    dev, train = dev[:n_dev], train[:n_train]
    if len(train) < n_train:
        sys.exit(f"{corpus} gives {len(dev) + len(train)} questions; lower --train-questions / --dev-questions")
    paths = {}
    out.mkdir(parents=True, exist_ok=True)
    for name, chunk in (("dev", dev), ("train", train)):
        paths[name] = out / f"{name}.json"
        paths[name].write_text(json.dumps({"version": "1.1", "data": [{"title": "docstrings", "paragraphs": chunk}]}))
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quickstart", type=Path, required=True, help="a `distil quickstart --stop-after evaluate` output")
    p.add_argument("--work", type=Path, required=True, help="folder for the runs (replaced)")
    p.add_argument("--teacher", type=Path, default=None, help="teacher folder (default: the quickstart's)")
    p.add_argument("--student", type=Path, default=None, help="student folder (default: the quickstart's)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-questions", type=int, default=5500)
    p.add_argument("--dev-questions", type=int, default=300)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--alpha-kd", type=float, default=0.5)
    p.add_argument("--alpha-task", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args()

    teacher = args.teacher or args.quickstart / "teacher" / "export"
    student = args.student or args.quickstart / "student" / "export"
    corpus = args.quickstart / "corpus.txt"
    for need in (teacher, student, corpus):
        if not need.exists():
            sys.exit(f"{need} is missing: run distil quickstart --output {args.quickstart} --stop-after evaluate first")
    if args.work.exists():
        shutil.rmtree(args.work)
    files = cloze_set(corpus, args.work / "squad", args.train_questions, args.dev_questions)
    common = ["--task", "squad", "--train", str(files["train"]), "--dev", str(files["dev"]), "--seeds", str(args.seeds),
              "--epochs", str(args.epochs), "--lr", str(args.lr), "--batch-size", "16", "--max-seq-len",
              str(args.max_seq_len), f"doc_stride={(args.max_seq_len - 52) // 2}", "max_query_len=48", "max_answer_len=8",
              "warmup_ratio=0.1", "--no-tracking", "inference=false"]
    runs = {"teacher": [str(teacher), "save_models=true"], "student": [str(student)],
            "student (D)": [str(student), "--distill-from", None, f"alpha_kd={args.alpha_kd}",
                            f"alpha_task={args.alpha_task}", f"temperature={args.temperature}"]}
    results, seconds = {}, {}
    for name, (model, *extra) in runs.items():
        if name == "student (D)":
            chosen = results["teacher"]["report"]["median_seed"]
            extra[1] = str(args.work / "teacher" / f"seed_{chosen}" / "model")
        out = args.work / name.replace(" ", "_").replace("(", "").replace(")", "")
        seconds[name] = run_distil(["finetune", "--model", model, *common, "--output", str(out), *extra], name)
        report = json.loads((out / "report.json").read_text())
        em = [100 * s["dev"]["dev_exact"] for s in report["seeds"]]
        f1 = [100 * s["dev"]["dev_f1"] for s in report["seeds"]]
        results[name] = {"report": report, "em": em, "f1": f1}

    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    summary = {}
    print(json.dumps({"train_questions": args.train_questions, "dev_questions": args.dev_questions,
                      "seeds": args.seeds, "epochs": args.epochs, "lr": args.lr, "max_seq_len": args.max_seq_len,
                      "alpha_kd": args.alpha_kd, "alpha_task": args.alpha_task, "temperature": args.temperature,
                      "teacher": str(teacher), "student": str(student)}))
    print("| model | params | EM mean | EM std | F1 mean | F1 std | per seed EM / F1 | fine-tuning s |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for name, r in results.items():
        em, em_sd = stats(r["em"])
        f1, f1_sd = stats(r["f1"])
        summary[name] = {"em": r["em"], "f1": r["f1"], "em_mean": em, "em_std": em_sd, "f1_mean": f1, "f1_std": f1_sd,
                         "parameters": r["report"]["num_parameters"], "seconds": seconds[name]}
        per_seed = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(r["em"], r["f1"], strict=True))
        print(f"| {name} | {r['report']['num_parameters']:,} | {em:.2f} | {em_sd:.2f} | {f1:.2f} | {f1_sd:.2f} | "
              f"{per_seed} | {seconds[name]:.0f} |")
    d, s = summary["student (D)"], summary["student"]
    print("\n| metric | (D) - student | spread (std D + std student) | exceeds the spread |")
    print("|---|---:|---:|---|")
    for metric in ("em", "f1"):
        diff = d[f"{metric}_mean"] - s[f"{metric}_mean"]
        spread = d[f"{metric}_std"] + s[f"{metric}_std"]
        summary[f"{metric}_difference"], summary[f"{metric}_spread"] = diff, spread
        print(f"| {metric.upper()} | {diff:+.2f} | {spread:.2f} | {'yes' if abs(diff) > spread else 'no'} |")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
