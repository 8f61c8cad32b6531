"""DeepSpeed's CPU collectives op after a killed run: an abandoned build lock no longer stalls every later
run, and the /dev/shm segments of the all-reduce are gone with the ranks (the suite-wide check in
tests/conftest.py, and test_train_distributed's launches, look for leftovers)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distil.pretrain import cpu_collectives

REPO = Path(__file__).resolve().parents[2]


def _hold_open(path: Path) -> subprocess.Popen:
    """Another process that keeps `path` open, as torch's lock holder does while it builds."""
    p = subprocess.Popen([sys.executable, "-c", f"f = open({str(path)!r}); print('open', flush=True); "
                          "import time; time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "open"
    return p


def test_a_lock_nobody_holds_is_removed_and_a_held_one_kept(tmp_path, capsys):
    lock = tmp_path / "lock"
    lock.touch()
    holder = _hold_open(lock)
    try:
        assert cpu_collectives.held_open(lock)
        assert not cpu_collectives.remove_abandoned_lock(lock) and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    assert not cpu_collectives.held_open(lock)
    assert cpu_collectives.remove_abandoned_lock(lock) and not lock.exists()
    assert f"removed {lock}" in capsys.readouterr().err
    assert not cpu_collectives.remove_abandoned_lock(lock)  # nothing there: nothing said


def test_a_killed_loaders_compiler_still_running_is_waited_for(tmp_path):
    """Its ninja and compilers outlive a loader killed alone; the lock goes once they have finished, not
    while they still write into the folder."""
    lock = tmp_path / "lock"
    lock.touch()
    compiler = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"], cwd=tmp_path)
    try:
        start = time.monotonic()
        assert cpu_collectives.working_in(tmp_path)
        assert cpu_collectives.remove_abandoned_lock(lock) and not lock.exists()
        assert compiler.poll() is not None and time.monotonic() - start >= 1.0
    finally:
        compiler.kill()
        compiler.wait()


def test_a_process_group_starts_over_a_lock_left_by_a_killed_build(tmp_path):
    """The lock file torch's JIT loader leaves when its holder is killed (here: put there, held by nobody).
    Before, every later process waited on it forever inside deepspeed.init_distributed."""
    if cpu_collectives._builder() is None:
        pytest.skip("DeepSpeed's CPU collectives op cannot be built on this machine (no compatible compiler)")
    from torch.utils.cpp_extension import _get_build_directory

    built = Path(_get_build_directory(cpu_collectives._builder().name, verbose=False))
    extensions = tmp_path / "torch_extensions"
    shutil.copytree(built, extensions / built.name, ignore=shutil.ignore_patterns("lock", "distil.flock"))
    (extensions / built.name / "lock").touch()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE")}
    env.update(TORCH_EXTENSIONS_DIR=str(extensions), DS_ACCELERATOR="cpu")
    code = ("from distil.pretrain.distributed import init_distributed; d = init_distributed(60); "
            "print('started', d.world_size, flush=True)")
    p = subprocess.run([sys.executable, "-P", "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "started 1" in p.stdout, p.stdout[-2000:]
    assert f"removed {extensions / built.name / 'lock'}" in p.stderr
    assert not (extensions / built.name / "lock").exists()


def test_the_segment_named_is_the_one_deepspeed_makes():
    """With the release skipped, DeepSpeed's segment is where `allreduce_buffer` says; released, it is gone
    (so the release removes DeepSpeed's segment, not a look-alike path)."""
    code = """
from distil.pretrain import cpu_collectives
from distil.pretrain.distributed import init_distributed
release = cpu_collectives.release_allreduce_buffer
cpu_collectives.release_allreduce_buffer = lambda rank, world: None
init_distributed(60)
segment = cpu_collectives.allreduce_buffer(0)
made = segment.exists()
release(0, 1)
print("made", made, "left", segment.exists())
"""
    from distributed_helpers import run_as_launched_rank

    assert run_as_launched_rank(code) == "made True left False"


def _load_op_under(fake_bin: Path) -> subprocess.CompletedProcess:
    """load_op in a process of its own group, as a rank under a scheduler, with `fake_bin` first on PATH."""
    code = ("from distil.pretrain.run import stopsignal; stopsignal.install(); "
            "from distil.pretrain import cpu_collectives; cpu_collectives.load_op(); "
            "print('loaded; stop signal', stopsignal.received(), flush=True)")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-P", "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, start_new_session=True)


def test_a_stop_signal_to_the_group_while_the_op_loads_is_kept_not_fatal(tmp_path):
    """SLURM signals the whole process group. A SIGTERM that arrives while torch runs `ninja --version` to
    load the op kills ninja; the rank recorded the signal and must load the op and go on to stop with a
    checkpoint, not crash with "Ninja is required" (seen in CI: exit 1 instead of 143)."""
    if cpu_collectives._builder() is None:
        pytest.skip("this DeepSpeed accelerator has no CPU collectives op to load")
    real = shutil.which("ninja")
    assert real, "ninja is installed with the environment (the op's JIT load needs it)"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    marker = tmp_path / "signalled"
    (fake_bin / "ninja").write_text(
        "#!/bin/sh\n"
        f"if [ ! -e {marker} ]; then touch {marker}; kill -TERM 0; sleep 5; exit 1; fi\n"
        f'exec {real} "$@"\n')
    (fake_bin / "ninja").chmod(0o755)
    r = _load_op_under(fake_bin)
    assert marker.exists(), "the fake ninja was not run: the op did not go through torch's JIT load"
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("loaded; stop signal 15")

    # Without a stop signal a failing load still fails (a missing ninja is not retried away).
    (fake_bin / "ninja").write_text("#!/bin/sh\nexit 1\n")
    r = _load_op_under(fake_bin)
    assert r.returncode != 0 and "ninja" in r.stderr
