"""The clone's root never shadows an installed package: commands started there, as the README and docs show
them, work with Hugging Face's `kernels` installed beside transformers (transformers imports it for hub
kernels; the clone has a kernels/ folder of its own, `distil.kernels` once installed).

The environment is a user's shell with .venv active in the clone's root: no PYTHONPATH, no safe-path mode
(PYTHONSAFEPATH) unless the command sets it itself. The launch scripts are run from the root the same way by
tests/cluster (test_cluster_sigterm.py: local, torchrun, hostfile, scheduled; test_cluster_slurm.py: sbatch),
and `python -m distil.pretrain.train` from the root by tests/pretrain/test_train_distributed.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def user_env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
             PATH=f"{BIN}:{e.get('PATH', '')}")
    return e


def in_root(*cmd: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=REPO, env=user_env(), capture_output=True, text=True, timeout=timeout)


def test_hugging_face_kernels_is_installed_and_used_by_transformers():
    """Without it the tests below could not tell a shadowed import from a missing one."""
    from transformers.utils import import_utils

    p = in_root(sys.executable, "-P", "-c", "import kernels; print(kernels.__file__)")
    assert p.returncode == 0 and "site-packages" in p.stdout, p.stderr[-2000:]
    if not import_utils.is_kernels_available():
        print("note: this transformers does not accept the installed kernels version; nothing imports it")


def test_python_started_in_the_root_imports_transformers_and_both_kernels():
    """`python -c` (and `python -m`) started in the root put the root first on sys.path."""
    code = ("import sys; assert sys.path[0] in ('', '.'), sys.path[:2]\n"
            "from transformers import BertForMaskedLM\n"
            "import kernels, distil.kernels\n"
            "print(kernels.__file__); print(distil.kernels.__file__)\n"
            "assert hasattr(distil.kernels, 'fused_linear_distillation_kl_ce')\n")
    p = in_root(sys.executable, "-c", code)
    assert p.returncode == 0, p.stderr[-3000:]
    theirs, ours = p.stdout.split()
    assert "site-packages" in theirs and not theirs.startswith(str(REPO / "kernels")), theirs
    assert Path(ours) == REPO / "kernels" / "__init__.py"


@pytest.mark.slow
def test_quickstart_first_stages_from_the_root(tmp_path):
    """The quickstart's stages run `python -P -m distil.pretrain.cli ...`: prepare, then the teacher stage,
    which imports transformers' BERT (where the shadowed `kernels` failed)."""
    out = tmp_path / "qs"
    p = in_root(str(BIN / "distil"), "quickstart", "--stop-after", "teacher", "--teacher-steps", "3",
                "--corpus-mb", "0.2", "--vocab-size", "300", "--output", str(out), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (out / "teacher" / "export" / "model.safetensors").is_file()
    assert not (out / "student").exists()
    assert "stopped after its teacher stage" in p.stdout
