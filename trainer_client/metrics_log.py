"""Where each step's metrics go: ``metrics.jsonl`` always, and the ``report_to`` sinks (TensorBoard, Weights &
Biases) with the same keys.

A step's line is written once its policy version is served (the line carries its push time), in step order.
A fresh run starts the file anew; a resumed run keeps the lines up to its step, and TensorBoard drops the
events after it. The sinks get every number of the line under the line's key (a nested key as
``outer/inner``), at the line's ``step``. Their packages are imported only when asked for.
"""

from __future__ import annotations

import json
import os
from numbers import Real
from pathlib import Path

from trainer_client.config import ConfigError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics line by key, nested dicts flattened to ``outer/inner``; not ``step``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out |= scalars(value, f"{prefix}{key}/")
        elif isinstance(value, Real) and key != "step":
            out[prefix + key] = float(value)
    return out


class TensorBoardSink:
    """Scalars in TensorBoard event files under ``log_dir`` (``tensorboard --logdir`` it)."""

    def __init__(self, log_dir: Path, resumed_at: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "report_to: tensorboard needs the `tensorboard` package: pip install tensorboard"
            ) from None
        purge = resumed_at + 1 if resumed_at is not None else None  # a resumed run rewrites later steps
        self.writer = SummaryWriter(str(log_dir), purge_step=purge)

    def write(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record["step"])
        self.writer.flush()  # a step is seconds apart: show it now, not at the writer's next timed flush

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run (its ``WANDB_*`` variables apply: ``WANDB_PROJECT``, ``WANDB_MODE=offline``)."""

    def __init__(self, out_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("report_to: wandb needs the `wandb` package: pip install wandb") from None
        project = os.environ.get("WANDB_PROJECT", "online-dpo")
        self.run = wandb.init(project=project, dir=str(out_dir), config=config)

    def write(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


class MetricsLog:
    """``metrics.jsonl`` in ``out_dir`` plus the ``report_to`` sinks; ``add`` a step's line, ``flush`` the
    lines of served versions."""

    def __init__(self, out_dir: Path, report_to: list[str], resumed_at: int | None, config: dict):
        self.sinks: list[TensorBoardSink | WandbSink] = []
        try:  # the sinks first: one that cannot start leaves an earlier metrics.jsonl as it was
            for name in dict.fromkeys(report_to):
                if name == "tensorboard":
                    self.sinks.append(TensorBoardSink(out_dir / TENSORBOARD_DIR, resumed_at))
                elif name == "wandb":
                    self.sinks.append(WandbSink(out_dir, config))
                else:
                    raise ConfigError(f"report_to: unknown sink {name!r}; expected tensorboard or wandb")
        except BaseException:
            self._close_sinks()
            raise
        self.path = out_dir / METRICS_FILE
        kept = []
        if resumed_at is not None and self.path.exists():
            lines = self.path.read_text().splitlines()
            kept = [ln for ln in lines if ln and json.loads(ln)["step"] <= resumed_at]
        self.path.write_text("".join(ln + "\n" for ln in kept))
        self.pending: list[dict] = []
        self.file = self.path.open("a")

    def add(self, record: dict) -> None:
        self.pending.append(record)

    def flush(self, served: int) -> None:
        """Write the lines of steps up to policy version ``served``."""
        while self.pending and self.pending[0]["step"] <= served:
            record = self.pending.pop(0)
            self.file.write(json.dumps(record) + "\n")
            for sink in self.sinks:
                sink.write(record)
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        self._close_sinks()

    def _close_sinks(self) -> None:
        for sink in self.sinks:
            sink.close()
