"""Starting a command as several CPU processes, the way users start it on GPUs: ``accelerate launch``
(torchrun underneath; `attrib.parallel` joins a gloo group on the CPU). Every process gets one torch thread
and no GPU, so a test means the same on any machine; the port is a free one, so runs never collide."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_env() -> dict[str, str]:
    """The environment of every run a parallel test compares: one thread, no GPU, offline."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_alone(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python *args`` as one process (the reference run)."""
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def launch(*args: str, processes: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes N *args`` (script path or ``-m module``)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *args]
    result = subprocess.run(command, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
