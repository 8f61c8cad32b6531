"""A one-host SLURM cluster in a temporary folder, for tests of the real launch scripts.

Debian's slurmctld / slurmd / munge, as root, without cgroups (proctrack/linuxproc, task/none): config,
state, spool, logs, pid files, the munge key and socket all live in the folder; the controller and node
daemon listen on free ports of 127.0.0.1. Every client call gets SLURM_CONF pointing at the folder's
slurm.conf (`SlurmCluster.env()`). `stop()` ends the daemons by their pid files.

`AuthInfo=cred_expire` is also how long a requeued job waits before it may start again (120 s by
default); the cluster sets it low so requeue tests do not sit idle for minutes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing_programs() -> list[str]:
    names = [*DAEMONS, "sbatch", "squeue", "scontrol", "scancel", "srun", "sinfo"]
    return [n for n in names if shutil.which(n) is None and not Path(f"/usr/sbin/{n}").exists()]


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2, cred_expire: int = 10):
        self.root = Path(root)
        self.cpus = cpus
        self.cred_expire = cred_expire
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.started: list[str] = []

    # -- set-up ----------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        ctld, slurmd = _free_port(), _free_port()
        self.conf.write_text(f"""\
ClusterName=distiltest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld}
SlurmdPort={slurmd}
AuthType=auth/munge
AuthInfo=socket={r}/run/munge.sock,cred_expire={self.cred_expire}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
ReturnToService=2
MpiDefault=none
KillWait=30
MinJobAge=600
MailProg=/bin/true
SchedulerParameters=sched_interval=2
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        e = dict(os.environ if base is None else base)
        e["SLURM_CONF"] = str(self.conf)
        return e

    def start(self, timeout: float = 60) -> None:
        self._write_config()
        r = self.root
        subprocess.run([_which("munged"), "--force", f"--key-file={r}/munge.key", f"--socket={r}/run/munge.sock",
                        f"--pid-file={r}/run/munged.pid", f"--log-file={r}/log/munged.log",
                        f"--seed-file={r}/run/munged.seed"], check=True, capture_output=True, timeout=30)
        self.started.append("munged")
        subprocess.run([_which("slurmctld"), "-f", str(self.conf), "-i"], check=True, capture_output=True,
                       env=self.env(), timeout=30)
        self.started.append("slurmctld")
        subprocess.run([_which("slurmd"), "-f", str(self.conf)], check=True, capture_output=True, env=self.env(),
                       timeout=30)
        self.started.append("slurmd")
        deadline = time.monotonic() + timeout
        while True:
            p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env())
            if p.returncode == 0 and p.stdout.strip() in ("idle", "mixed", "allocated"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test SLURM node is not up after {timeout} s (sinfo: {p.stdout.strip()} "
                                   f"{p.stderr.strip()}); logs in {r / 'log'}:\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(out)

    def cancel_jobs(self, timeout: float = 90) -> None:
        """Cancels every job of the cluster and waits until none is left running (their processes ended)."""
        p = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=self.env(), timeout=30)
        jobs = p.stdout.split()
        if not jobs:
            return
        subprocess.run(["scancel", *jobs], capture_output=True, env=self.env(), timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=self.env(),
                               timeout=30)
            if not p.stdout.split():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        for name in reversed(DAEMONS):
            pid_file = self.root / "run" / f"{name}.pid"
            if name not in self.started or not pid_file.is_file():
                continue
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (ValueError, ProcessLookupError, IndexError):
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # -- client calls ----------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env(env), cwd=cwd, timeout=60)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout} {p.stderr}")
        return p

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, ...)."""
        text = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\S+?)=(\S*)", text))
