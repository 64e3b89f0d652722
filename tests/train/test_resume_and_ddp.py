"""A run killed with SIGKILL and resumed gives the uninterrupted loss curve; 2-process DDP equals 1 process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from toy_model import train_toy  # noqa: E402

SCRIPT = Path(__file__).parent / "run_toy.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(*args, timeout=120):
    subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], check=True, env=ENV, timeout=timeout)


def _run_here(out, steps):
    """The reference run, in this process (one thread, as the subprocesses use)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_toy(out, steps=steps)
    finally:
        torch.set_num_threads(threads)


def test_sigkill_then_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    _run_here(tmp_path / "straight.json", 12)
    ckpt = tmp_path / "ckpt"
    args = ["--out", tmp_path / "killed.json", "--steps", 12, "--ckpt", ckpt, "--checkpoint-every", 1, "--sleep", 0.2]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], env=ENV)
    deadline = time.time() + 90
    try:
        while time.time() < deadline:
            latest = ckpt / "latest.json"
            if latest.exists() and json.loads(latest.read_text())["step"] >= 5:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.json").exists()
    _run("--out", tmp_path / "resumed.json", "--steps", 12, "--ckpt", ckpt, "--checkpoint-every", 1)
    straight = json.loads((tmp_path / "straight.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert 5 <= resumed["resumed_from"] < 12
    # bit-identical: same data, same restored optimizer/RNG state, same arithmetic
    assert resumed["losses"] == straight["losses"] and len(straight["losses"]) == 12
    assert resumed["params"] == straight["params"]
    assert resumed["final"] == straight["final"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_a_single_process_of_the_same_global_batch(tmp_path):
    _run_here(tmp_path / "single.json", 6)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(SCRIPT), "--out", str(tmp_path / "ddp.json"), "--steps", "6"]
    subprocess.run(cmd, check=True, env=ENV, timeout=180)
    single = json.loads((tmp_path / "single.json").read_text())
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    # the two ranks' gradients are summed in a different order than one process sums them: fp32 rounding
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ddp["params"]), torch.tensor(single["params"]), rtol=1e-4, atol=1e-5)
    assert ddp["accuracy"] == single["accuracy"]
