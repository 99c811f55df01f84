"""The short soak (issue 15, item 2): ``bench/soak.py --short`` against a real server, about 2 minutes.

Concurrent clients and a pusher swapping weights every 2 s for 50 s, with a pusher killed mid-upload, a
truncated and a corrupted upload, a full work folder (where a tmpfs can be mounted) and clients that never
read their answers. The harness checks every target itself (see its docstring); here we assert the
figures the issue names, so a failure says which target was missed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_short_soak_meets_every_target(tmp_path):
    out = tmp_path / "soak.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [sys.executable, str(REPO_ROOT / "bench" / "soak.py"), "--short"]
    command += ["--out", str(out), "--work-root", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=840)
    print(result.stdout[-6000:])
    assert out.exists(), result.stdout[-4000:] + result.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert figures["requests_answered"] > 0 and figures["reloads_done"] > 5, figures
    assert figures["requests_failed"] == 0, figures["failure_causes"]
    assert figures["digest_failures"] == [] and figures["digest_checks"] >= figures["faults_injected"]
    assert figures["versions_whose_answers_mismatch"] == []
    assert figures["max_logprob_diff_to_reported_version"] <= 1e-2
    assert figures["min_logprob_diff_to_another_version"] > 1e-2  # the check tells versions apart
    assert figures["bytes_changed_by_refused_pushes"] == 0
    assert figures["faults_failed"] == [], figures["faults"]
    assert figures["targets_missed"] == [] and result.returncode == 0, result.stdout[-4000:]
