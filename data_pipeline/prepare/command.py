"""The `distil prepare` command: options and `--config FILE key=value ...` -> a validated PrepareConfig."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from distil.common.config import flag, is_override, load_command_config
from distil.data_pipeline.prepare import stage
from distil.data_pipeline.prepare.corpus import DOC_SEPARATORS
from distil.data_pipeline.prepare.tokenize import TOKENIZER_KINDS

_INTERNAL = {"command", "progress", "batch_bytes", "shuffle_bucket_bytes"}


def canonical_command(config: stage.PrepareConfig) -> list[str]:
    """A re-runnable command line for the settings (equal settings -> equal list, however they were given:
    options, a --config file or key=value)."""
    command = ["distil", "prepare"]
    for path in config.inputs:
        command += ["--input", str(path)]
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "shuffle":
            command += [] if value else ["--no-shuffle"]
            continue
        if f.name in _INTERNAL or f.name == "inputs" or value is None or value is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        command += [flag] if value is True else [flag, str(value)]
    return command


def load_prepare_config(config_path: str | None, args: tuple[str, ...], options: dict) -> stage.PrepareConfig:
    """`--config` file < options < `key=value` arguments; other arguments are input paths."""
    overrides = [a for a in args if is_override(a)]
    paths = [a for a in args if not is_override(a)]
    inputs = list(options.pop("inputs")) + paths
    shortcuts = {"inputs": inputs or None, **{k: v for k, v in options.items() if v is not None}}
    shortcuts["pack"] = flag(options["pack"], True)
    shortcuts["overwrite"] = flag(options["overwrite"], True)
    shortcuts["shuffle"] = flag(shortcuts.pop("no_shuffle"), False)
    if "output" in shortcuts:
        shortcuts["output"] = str(shortcuts["output"])
    return load_command_config(stage.PrepareConfig, config_path, overrides, shortcuts, "max_seq_len=128")


@click.command("prepare", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="FILE",
              help="YAML file with any of the settings below (keys as the long options, with _: max_seq_len). "
                   "Options and key=value arguments override it.")
@click.option("--input", "-i", "inputs", multiple=True, metavar="PATH",
              help="Text, JSONL or Parquet file, folder or glob (.gz/.zst ok). Repeat, or list paths after it.")
@click.argument("args", nargs=-1, metavar="[PATH | key=value]...")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Folder for the shard set.  [required]")
@click.option("--tokenizer", metavar="NAME_OR_DIR", help="A fast HF tokenizer: local folder or cached hub name.")
@click.option("--train-tokenizer", type=int, metavar="VOCAB_SIZE",
              help="Train a tokenizer of this size on the corpus (saved beside the shards): an uncased WordPiece "
                   "as BERT's unless --train-tokenizer-kind says otherwise.")
@click.option("--train-tokenizer-kind", type=click.Choice(TOKENIZER_KINDS),
              help="With --train-tokenizer: wordpiece (BERT, DistilBERT, ModernBERT students of a BERT-style "
                   "vocabulary) or bpe (byte-level, as RoBERTa's: <s> </s> <pad> <mask>).  [default: wordpiece]")
@click.option("--max-seq-len", type=int, help="Longest sequence, with [CLS]/[SEP].  [default: 512]")
@click.option("--workers", type=int, help="Tokeniser processes.  [default: one per CPU, fewer for a small corpus]")
@click.option("--pack", is_flag=True,
              help="Fill each sequence with consecutive lines of one document (blank-line-separated text, or the "
                   "lines of a JSONL/Parquet text) up to --max-seq-len.")
@click.option("--holdout-fraction", type=float,
              help="Share of documents written to a held-out shard set (holdout-*.tar).  [default: 0]")
@click.option("--shard-size-mb", type=float, help="Target size of one shard.  [default: 256]")
@click.option("--text-field", help="JSONL field / Parquet column with the text.  [default: text]")
@click.option("--doc-separator", type=click.Choice(DOC_SEPARATORS),
              help="Plain text: one document per line, or documents separated by blank lines.  [default: line]")
@click.option("--overwrite", is_flag=True, help="Replace a shard set already in --output.")
@click.option("--seed", type=int, help="Seed of the held-out document choice and of the shuffle.  [default: 0]")
@click.option("--no-shuffle", is_flag=True,
              help="Write sequences in corpus order. By default each split is shuffled as a whole (seeded by --seed, "
                   "through temporary bucket files beside the output: about the output's size of extra disk), so "
                   "neighbouring sequences of one document do not land in the same batches.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def prepare(config_path: str | None, args: tuple[str, ...], quiet: bool, **options) -> None:
    """Raw text -> tokenised webdataset shards, manifest.json, token_counts.npy and the tokenizer.

    Sequences are written in a random order seeded by --seed (--no-shuffle: corpus order). The same
    inputs and settings give byte-identical output; the shard set appears in --output only once complete.
    """
    config = load_prepare_config(config_path, args, options)
    config.progress = not quiet
    config.command = canonical_command(config)
    manifest = stage.prepare(config)
    stats = manifest.stats
    click.echo(
        f"wrote {stats['train_sequences']} sequences ({manifest.total_tokens} tokens) in {len(manifest.shards)} "
        f"shard(s) and {stats['holdout_sequences']} held-out in {len(manifest.holdout_shards)} to {config.output} "
        f"(dropped {stats['dropped_short']} short, {stats['dropped_unk']} mostly-[UNK]; "
        f"{stats['replaced_utf8']} invalid UTF-8 sequences replaced)"
    )
