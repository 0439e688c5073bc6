"""Running a test script as 2 torch.distributed ranks (gloo, 127.0.0.1), bounded in time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(tmp_path, text: str, *args: str, world: int = 2, timeout: int = 300) -> list[str]:
    """Run ``text`` as ``world`` ranks; each must exit 0 with a last line "ok <rank> ...". Returns their stdout."""
    script = tmp_path / "rank.py"
    script.write_text(text)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
               TESTS_DIR=os.path.dirname(__file__), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), *args], env=dict(env, RANK=str(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(world)]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()
    for rank, (code, out, err) in enumerate(outputs):
        last = out.strip().splitlines()[-1] if out.strip() else ""
        assert code == 0 and last.startswith(f"ok {rank}"), f"rank {rank} failed:\n{out[-2000:]}\n{err[-4000:]}"
    return [out for _, out, _ in outputs]
