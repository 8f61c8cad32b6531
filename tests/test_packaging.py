"""distil installs as one import root, `distil`, and works from a wheel, not only from a clone.

The repository's folders (common/, pretrain/, kernels/, data_pipeline/) install as `distil.common`, ... and the
configs, DeepSpeed JSONs and launch scripts ship as package data, so nothing generic lands in site-packages
and Hugging Face's `kernels` distribution installs beside distil.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE_FOLDERS = ("common", "pretrain", "kernels", "data_pipeline")
DATA_FOLDERS = ("configs", "ds_configs", "launch")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_python_folder_is_packaged_under_distil():
    setuptools = _pyproject()["tool"]["setuptools"]
    expected = set()
    for top in CODE_FOLDERS:
        for init in (REPO / top).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO)
            expected.add("distil." + ".".join(relative.parts))
    packaged = set(setuptools["packages"])
    assert expected - packaged == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert {p for p in packaged if not p.startswith("distil.")} == set()
    for top in (*CODE_FOLDERS, *DATA_FOLDERS):
        assert setuptools["package-dir"][f"distil.{top}"] == top


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # setuptools builds in the tree and reuses build/lib: a module deleted since an earlier build would
    # still go into the wheel, so every build starts without it.
    shutil.rmtree(REPO / "build", ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(REPO)], check=True, capture_output=True, text=True, timeout=300)
    (path,) = out.glob("distil-*.whl")
    return path


def test_wheel_provides_only_the_distil_import_name_and_ships_the_configs(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert archive.read(top_level).decode().split() == ["distil"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"distil"}
    for folder, suffix in (("configs", ".yaml"), ("ds_configs", ".json"), ("launch", ".sh")):
        shipped = {p.name for p in (REPO / folder).iterdir() if p.name.endswith(suffix)}
        assert shipped and shipped <= {Path(n).name for n in names if n.startswith(f"distil/{folder}/")}
    assert "distil/launch/slurm.sbatch" in names
    assert "distil/pretrain/trainer.py" in names and "distil/kernels/kl_ce.py" in names


def test_hugging_face_kernels_installs_beside_distil(tmp_path):
    """HF's `kernels` (transformers' hub kernels) is a test dependency: both import, and BERT still builds.

    Run from another folder: from the clone's root, Python's path starts with the clone, whose kernels/ folder
    then shadows any top-level `kernels` (the installed names are the point here)."""
    script = """
import sys
from pathlib import Path
import torch
from transformers import BertConfig, BertForMaskedLM
import distil.kernels as ours
import kernels as hf_kernels
print(Path(ours.__file__).resolve().parent)
print(Path(hf_kernels.__file__).resolve())
assert hasattr(hf_kernels, "get_kernel") and hasattr(ours, "fused_linear_distillation_kl_ce")
bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32))
ids = torch.randint(5, 50, (2, 8))
assert bert(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (2, 8, 50)
"""
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ours, theirs = p.stdout.split()
    assert Path(ours) == REPO / "kernels"
    assert "site-packages" in theirs and not theirs.startswith(str(REPO) + "/kernels")


def _fresh_env_with_wheel(root: Path, wheel: Path) -> Path:
    """A new virtual environment holding the wheel; its dependencies come from this environment's
    site-packages through a .pth line (which does not run the editable install's own .pth hook)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    return root / "bin"


@pytest.mark.slow
def test_installed_wheel_runs_init_and_the_quickstart_from_an_empty_folder(wheel, tmp_path):
    bin_dir = _fresh_env_with_wheel(tmp_path / "env", wheel)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", PATH=f"{bin_dir}:{env['PATH']}")

    def distil(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(bin_dir / "distil"), *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=900)

    where = subprocess.run([str(bin_dir / "python"), "-c", "import distil.pretrain; print(distil.pretrain.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert str(tmp_path / "env") in where, where  # the wheel's copy, not the clone's

    copied = distil("init", "mine")
    assert copied.returncode == 0, copied.stderr[-2000:]
    assert (work / "mine/configs/distilbert_base_uncased.yaml").is_file()
    assert os.access(work / "mine/launch/slurm.sbatch", os.X_OK)
    again = distil("init", "mine")
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "--overwrite" in again.stderr

    # up to the student: the stages that read the shipped configs (the whole quickstart runs from the clone in CI)
    run = distil("quickstart", "--teacher-steps", "4", "--student-steps", "4", "--corpus-mb", "0.3",
                 "--vocab-size", "500", "--stop-after", "student")
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    assert (work / "quickstart/student/export/model.safetensors").is_file()
