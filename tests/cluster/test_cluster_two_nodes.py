"""Two nodes on one machine through the project's launch scripts: torchrun with two agents meeting at a c10d
rendezvous on 127.0.0.1 (launch/torchrun.sh, NNODES=2), and the DeepSpeed launcher with a two-host
hostfile started once per node without ssh (launch/hostfile.sh, NODE_RANK=i -> --no_ssh --node_rank i).
2 nodes x 1 process give bitwise the export of 1 node x 2 processes (same seed, same global batch)."""

from __future__ import annotations

import subprocess

import pytest
from cluster_helpers import REPO, env, finish_ranks, free_port, same_weights, start_ranks

pytestmark = pytest.mark.slow


def distill_args(shards, teacher, out) -> list[str]:
    return [f"data.shards={shards}", f"teacher.path={teacher}", f"run.output_dir={out}", "run.max_steps=8",
            "run.log_every=2", "checkpoint.every=4"]


def two_nodes(cmd: list[str], per_node_env: list[dict[str, str]], timeout: int = 300) -> list[str]:
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env(**e), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for e in per_node_env]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=60)
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"node {i} exited {p.returncode}:\n{logs[i][-5000:]}"
    return logs


def test_two_nodes_through_torchrun_and_the_deepspeed_hostfile_equal_one_node(shards, teacher, tmp_path):
    reference = tmp_path / "one_node"
    finish_ranks(start_ranks(["--config", "configs/tiny_cpu.yaml", *distill_args(shards, teacher, reference)], 2))

    out = tmp_path / "torchrun"
    endpoint = f"127.0.0.1:{free_port()}"
    logs = two_nodes(["bash", "launch/torchrun.sh", "configs/tiny_cpu.yaml", *distill_args(shards, teacher, out)],
                     [dict(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=endpoint, RDZV_ID="two-nodes")
                      for i in range(2)])
    same_weights(reference / "export", out / "export")

    out = tmp_path / "hostfile"
    hostfile = tmp_path / "hostfile.txt"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    logs = two_nodes(["bash", "launch/hostfile.sh", str(hostfile), "configs/tiny_cpu.yaml",
                      *distill_args(shards, teacher, out)],
                     [dict(NODE_RANK=str(i), MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for i in range(2)])
    assert all("nnodes=2, num_local_procs=1" in log for log in logs), logs[0][-3000:]
    same_weights(reference / "export", out / "export")


def test_node_rank_outside_the_hostfile_is_one_error(tmp_path):
    hostfile = tmp_path / "hostfile.txt"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    p = subprocess.run(["bash", "launch/hostfile.sh", str(hostfile), "configs/tiny_cpu.yaml"], cwd=REPO,
                       env=env(NODE_RANK="2"), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error: NODE_RANK=2") and len(p.stderr.splitlines()) == 1
