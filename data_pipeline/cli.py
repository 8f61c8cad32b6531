"""The `distil prepare` command."""

from __future__ import annotations

from pathlib import Path

import click

from distil.data_pipeline import prepare as stage
from distil.data_pipeline.corpus import DOC_SEPARATORS


def _command_line(params: dict) -> list[str]:
    """A canonical, re-runnable command line from the parsed options (same flags -> same list)."""
    command = ["distil", "prepare"]
    for path in params["inputs"]:
        command += ["--input", str(path)]
    for name, value in params.items():
        if name in ("inputs", "input_args") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        command += [flag] if value is True else [flag, str(value)]
    return command


@click.command("prepare", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--input", "-i", "inputs", multiple=True, metavar="PATH",
              help="Text, JSONL or Parquet file, folder or glob (.gz/.zst ok). Repeat, or list paths after it.")
@click.argument("input_args", nargs=-1, metavar="[PATH]...")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Folder for the shard set.")
@click.option("--tokenizer", metavar="NAME_OR_DIR", help="A fast HF tokenizer: local folder or cached hub name.")
@click.option("--train-tokenizer", type=int, metavar="VOCAB_SIZE",
              help="Train an uncased WordPiece of this size on the corpus (saved beside the shards).")
@click.option("--max-seq-len", default=512, show_default=True, type=int, help="Longest sequence, with [CLS]/[SEP].")
@click.option("--workers", type=int, help="Tokeniser processes.  [default: one per CPU, fewer for a small corpus]")
@click.option("--pack", is_flag=True,
              help="Fill each sequence with consecutive lines of one document (blank-line-separated text, or the "
                   "lines of a JSONL/Parquet text) up to --max-seq-len.")
@click.option("--holdout-fraction", default=0.0, show_default=True, type=float,
              help="Share of documents written to a held-out shard set (holdout-*.tar).")
@click.option("--shard-size-mb", default=256.0, show_default=True, type=float, help="Target size of one shard.")
@click.option("--text-field", default="text", show_default=True, help="JSONL field / Parquet column with the text.")
@click.option("--doc-separator", type=click.Choice(DOC_SEPARATORS), default="line", show_default=True,
              help="Plain text: one document per line, or documents separated by blank lines.")
@click.option("--overwrite", is_flag=True, help="Replace a shard set already in --output.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the held-out document choice and of the shuffle.")
@click.option("--no-shuffle", is_flag=True,
              help="Write sequences in corpus order. By default each split is shuffled as a whole (seeded by --seed, "
                   "through temporary bucket files beside the output: about the output's size of extra disk), so "
                   "neighbouring sequences of one document do not land in the same batches.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def prepare(**params) -> None:
    """Raw text -> tokenised webdataset shards, manifest.json, token_counts.npy and the tokenizer.

    Sequences are written in a random order seeded by --seed (--no-shuffle: corpus order). The same
    inputs and flags give byte-identical output; the shard set appears in --output only once complete.
    """
    params["inputs"] = tuple(params["inputs"]) + tuple(params["input_args"])
    quiet = params.pop("quiet")
    config = stage.PrepareConfig(
        inputs=list(params["inputs"]),
        output=params["output"],
        tokenizer=params["tokenizer"],
        train_tokenizer=params["train_tokenizer"],
        max_seq_len=params["max_seq_len"],
        workers=params["workers"],
        pack=params["pack"],
        holdout_fraction=params["holdout_fraction"],
        shard_size_mb=params["shard_size_mb"],
        text_field=params["text_field"],
        doc_separator=params["doc_separator"],
        overwrite=params["overwrite"],
        seed=params["seed"],
        shuffle=not params["no_shuffle"],
        command=_command_line(params),
        progress=not quiet,
    )
    manifest = stage.prepare(config)
    stats = manifest.stats
    click.echo(
        f"wrote {stats['train_sequences']} sequences ({manifest.total_tokens} tokens) in {len(manifest.shards)} "
        f"shard(s) and {stats['holdout_sequences']} held-out in {len(manifest.holdout_shards)} to {params['output']} "
        f"(dropped {stats['dropped_short']} short, {stats['dropped_unk']} mostly-[UNK]; "
        f"{stats['replaced_utf8']} invalid UTF-8 sequences replaced)"
    )
