"""The fuzz tests share tests/data_pipeline's builders (shardset.py, conftest_prepare.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_pipeline"))
