"""`distil init DIR`: copies the shipped configs, DeepSpeed JSONs and launch scripts out to edit."""

from __future__ import annotations

import click

from distil.common import assets


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("folder", type=click.Path(file_okay=False), default=".")
@click.option("--overwrite", is_flag=True, help="Replace files of the same name already in FOLDER.")
def init(folder: str, overwrite: bool) -> None:
    """Write configs/, ds_configs/ and launch/ into FOLDER (default: here) to edit and submit from.

    `--config NAME` and `engine.ds_config` also take the shipped names directly, without copying.
    """
    written = assets.copy_shipped(folder, overwrite=overwrite)
    for kind in assets.SHIPPED:
        names = [p.name for p in written if p.parent.name == kind]
        click.echo(f"{kind}/: {', '.join(names)}")
    click.echo(f"{len(written)} files written under {folder}; e.g. distil train --config "
               f"{folder}/configs/distilbert_base_uncased.yaml data.shards=...")
