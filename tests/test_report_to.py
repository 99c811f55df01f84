"""``report_to``: the metrics sinks beside metrics.jsonl (no server; a training run that logs to TensorBoard
is in test_reward_functions.py)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer_client.config import ConfigError, load_config
from trainer_client.metrics_log import METRICS_FILE, TENSORBOARD_DIR, MetricsLog


def line(step: int, reward: float) -> dict:
    return {"step": step, "reward_mean": reward, "loss": None, "replicas": {"a": {"tokens": 10 * step}}}


def tensorboard_scalars(out) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(out / TENSORBOARD_DIR))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_lines_go_to_jsonl_and_tensorboard_once_served_and_a_resume_rewrites_later_steps(tmp_path):
    log = MetricsLog(tmp_path, ["tensorboard"], resumed_at=None, config={})
    for step in (1, 2, 3):
        log.add(line(step, step / 10))
    log.flush(served=2)  # step 3's version is not served yet
    assert [json.loads(x)["step"] for x in (tmp_path / METRICS_FILE).read_text().splitlines()] == [1, 2]
    log.flush(served=3)
    log.close()
    logged = tensorboard_scalars(tmp_path)
    assert logged.keys() == {"reward_mean", "replicas/a/tokens"}  # numbers only; nested keys flattened
    assert logged["reward_mean"] == [
        (1, pytest.approx(0.1)),
        (2, pytest.approx(0.2)),
        (3, pytest.approx(0.3)),
    ]

    log = MetricsLog(tmp_path, ["tensorboard"], resumed_at=2, config={})  # resumed from step 2's checkpoint
    log.add(line(3, 0.9))
    log.flush(served=3)
    log.close()
    steps = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [(r["step"], r["reward_mean"]) for r in steps] == [(1, 0.1), (2, 0.2), (3, 0.9)]
    reward = tensorboard_scalars(tmp_path)["reward_mean"]
    assert reward == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.9))]


def test_report_to_is_validated(tmp_path):
    assert load_config(None, ["model=m", "report_to=tensorboard"]).report_to == ["tensorboard"]
    assert load_config(None, ["model=m"]).report_to == []
    with pytest.raises(ConfigError, match="report_to"):
        load_config(None, ["model=m", "report_to=[mlflow]"])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_asked_for_but_not_installed_is_a_clear_error(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match=r"report_to: wandb needs the `wandb` package: pip install wandb"):
        MetricsLog(tmp_path, ["tensorboard", "wandb"], resumed_at=None, config={})
    assert (tmp_path / METRICS_FILE).read_text() == '{"step": 1}\n'  # an earlier run's metrics are kept
