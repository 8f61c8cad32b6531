"""The fuzz tests share tests/data_pipeline's shard-set builder (shardset.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_pipeline"))
