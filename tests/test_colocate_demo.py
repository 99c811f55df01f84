"""End to end in colocated mode: ``trainer-client demo --set mode=colocate`` (no server; the vLLM CPU engine
inside the trainer process) must raise the held-out reward as the server-mode demo does
(tests/test_demo.py): same starter recipe, same steps, same bar.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import psutil
import pytest

STEPS = 60


@pytest.mark.slow
def test_colocated_demo_raises_heldout_reward(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [
        sys.executable, "-m", "trainer_client", "demo", "--model", "starter",
        "--seed", "0", "--steps", str(STEPS),
        "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
        "--set", "mode=colocate", "--set", "progress_bar=false",
    ]  # fmt: skip
    log_out, log_err = (tmp_path / "stdout.txt").open("w+"), (tmp_path / "stderr.txt").open("w+")
    with log_out, log_err:
        proc = subprocess.Popen(cmd, env=env, stdout=log_out, stderr=log_err, text=True)
    children, deadline = set(), time.monotonic() + 1200
    while proc.poll() is None:  # what it starts: short-lived helpers at most, no server, no engine process
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    children.add(f"{child.name()}: {' '.join(child.cmdline())[:200]}")
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(1)
    stdout, stderr = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "online DPO (colocated)" in stdout and "generation server" not in stdout
    engines = [c for c in children if "generator_server" in c or "vllm" in c.lower() or "engine" in c.lower()]
    assert not engines, f"colocated demo started server or engine processes: {engines}"

    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["config"]["mode"] == "colocate"
    assert summary["steps"] == STEPS and len(records) == STEPS
    assert all(0 <= r["staleness"] <= 1 for r in records)
    assert (out / "curves.png").stat().st_size > 10_000
    assert 0.2 <= summary["heldout_reward_before"] <= 0.8
    assert summary["heldout_reward_after"] >= summary["heldout_reward_before"] + 0.03, summary
