"""Data and model lineage of a run: the shard set it read as an MLflow dataset input, and the model it started
from (a distillation's teacher, an evaluation's model) as a model input.

A shard set is one MLflow dataset per split: name = the shard folder's name (with `:<split>` for a split other
than train), digest = a hash of its manifest (same manifest, same digest: the UI groups and filters runs by
it), source = where the shards are (a local folder or a URL), schema = one sample (`ids`: the token ids), and
a profile with the split, sequence, token and shard counts. MLflow keys datasets by (name, digest) within an
experiment, so the split is part of the name: the train and held-out splits of one shard set have different
counts.

Models are MLflow 3 LoggedModels. A model exported by a tracked distil run carries the tag `distil.model_path`
(its export folder, resolved); a run that starts from that folder links that model. A model no run of the
store logged (a hub teacher such as bert-base-uncased, a folder from elsewhere) is recorded once per experiment
as an external LoggedModel (MLflow's kind for a model stored outside MLflow) with the same tag, and linked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from distil.pretrain.tracking.params import redact_uri

MODEL_PATH_TAG = "distil.model_path"
EXTERNAL_MODEL_TAG = "mlflow.model.isExternal"  # mlflow.utils.mlflow_tags.MLFLOW_MODEL_IS_EXTERNAL
DATASET_CONTEXT_TAG = "mlflow.data.context"  # mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT
DIGEST_LENGTH = 12  # hex characters (MLflow stores up to 36)


def manifest_digest(manifest: Any) -> str:
    """A hash of the manifest's canonical JSON: shard names, sizes and token counts, tokenizer hash, seed."""
    return hashlib.sha256(manifest.to_json().encode("utf-8")).hexdigest()[:DIGEST_LENGTH]


def shard_set_location(shards: str) -> str:
    """The shard set's folder (resolved) or URL prefix, whether `shards` names the folder or its manifest."""
    from distil.data_pipeline.manifest import base_of, is_remote, manifest_location

    location = base_of(manifest_location(shards))
    return location if is_remote(location) else str(Path(location).expanduser().resolve())


def shard_set_dataset(shards: str, manifest: Any, split: str = "train") -> dict[str, str]:
    """The fields of an mlflow.entities.Dataset for one split of a shard set (no mlflow import here)."""
    location = shard_set_location(shards)
    infos = manifest.shards if split == "train" else manifest.holdout_shards
    name = Path(location.rstrip("/")).name or "shards"
    if split != "train":
        name = f"{name}:{split}"
    if location.startswith(("http://", "https://")):
        source_type, source = "http", {"url": redact_uri(location)}
    elif location.startswith("pipe:"):
        source_type, source = "external", {"uri": redact_uri(location)}
    else:
        source_type, source = "local", {"uri": location}
    profile = {"split": split, "sequences": sum(s.samples for s in infos),
               "tokens": sum(s.tokens for s in infos), "shards": len(infos), "max_len": manifest.max_len,
               "vocab_size": manifest.vocab_size, "tokenizer": manifest.tokenizer_name}
    schema = {"mlflow_colspec": [{"type": "array", "items": {"type": "integer"}, "name": "ids", "required": True}]}
    return {"name": name, "digest": manifest_digest(manifest), "source_type": source_type,
            "source": json.dumps(source), "schema": json.dumps(schema), "profile": json.dumps(profile)}


def model_key(path: str) -> str:
    """How a model is recognised across runs: a local folder by its resolved path, anything else (a hub id)
    as given."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else str(path)


def find_model(client: Any, key: str) -> str | None:
    """The id of the newest LoggedModel tagged with this model path in any experiment of the store, preferring
    one a run logged over an external record."""
    if "'" in key:
        return None  # cannot be quoted in a filter string; the run keeps the path as a param
    experiment_ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    if not experiment_ids:
        return None
    found = client.search_logged_models(experiment_ids, filter_string=f"tags.`{MODEL_PATH_TAG}` = '{key}'",
                                        order_by=[{"field_name": "creation_time", "ascending": False}],
                                        max_results=50)
    models = sorted(found, key=lambda m: m.tags.get(EXTERNAL_MODEL_TAG) == "true")  # logged ones first
    return models[0].model_id if models else None


def external_model(client: Any, experiment_id: str, key: str, role: str) -> str:
    """Records a model stored outside MLflow (hub id or folder) as an external LoggedModel; returns its id."""
    from mlflow.entities import LoggedModelStatus

    name = Path(key.rstrip("/")).name or key
    model = client.create_logged_model(experiment_id, name=name, model_type=role,
                                       tags={MODEL_PATH_TAG: key, EXTERNAL_MODEL_TAG: "true"})
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id
