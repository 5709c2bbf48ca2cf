"""Experiment trackers: TensorBoard and Weights & Biases through Avalanche's loggers, MLflow and a
plain CSV through two small loggers of the same interface (`log_single_metric(name, value, step)`).

What is logged: per training step `train/loss` (the total the optimizer sees), `train/lr` and
`train/penalty/<plugin>` for every plugin that reports one; per evaluation round every matrix
cell as `eval/<kind>/<dataset>` at the round's index (0 = pretrained, t = after task t); at the
end every metric as `metrics/<kind>/<key>`.
"""
from __future__ import annotations

import csv
import math
import os
import secrets
from pathlib import Path
from typing import Any, Optional, Sequence

from avalanche.core import SupervisedPlugin
from avalanche.logging import BaseLogger

from ..errors import CfbenchError
from ..files import open_append

TRACKERS = ("tensorboard", "wandb", "mlflow", "csv")


class CSVMetricsLogger(BaseLogger):
    """Rows name,step,value appended to one CSV (Avalanche's CSVLogger expects its own metric names)."""

    def __init__(self, path: Path):
        super().__init__()
        new = not path.exists()
        self._file = open_append(path, "tracker CSV", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(["name", "step", "value"])

    def log_single_metric(self, name, value, x_plot) -> None:
        self._writer.writerow([name, int(x_plot), repr(float(value))])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MLflowLogger(BaseLogger):
    """One MLflow run; without $MLFLOW_TRACKING_URI a local file store in the run folder."""

    def __init__(self, tracking_uri: str, run_name: str, params: dict[str, Any]):
        super().__init__()
        try:
            import mlflow
        except ImportError:
            raise CfbenchError("loggers: mlflow is not installed; pip install 'cfbench[mlflow]'") from None
        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment("cfbench")
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log_single_metric(self, name, value, x_plot) -> None:
        self.mlflow.log_metric(name.replace("Δ", "delta"), float(value), step=int(x_plot))

    def close(self) -> None:
        self.mlflow.end_run()


def _wandb_logger(run_dir: Path, run_name: str, cfg: dict) -> BaseLogger:
    """Avalanche's WandBLogger, with training steps and evaluation rounds on their own x-axes
    (W&B's own step must only grow; rounds restart at 0)."""
    from avalanche.logging import WandBLogger

    class Logger(WandBLogger):
        def log_single_metric(self, name, value, x_plot):
            self.wandb.log({name: value, "round" if name.startswith(("eval/", "metrics/")) else "step": x_plot})

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    # an explicit id: Avalanche 0.6 would call wandb.util.generate_id, which wandb 0.31 no longer has
    run_id = os.environ.get("WANDB_RUN_ID") or secrets.token_hex(8)
    logger = Logger(project_name=os.environ.get("WANDB_PROJECT", "cfbench"), run_name=run_name, dir=str(run_dir),
                    save_code=False, config=_flat(cfg), params={"mode": mode, "id": run_id})
    for axis, pattern in (("step", "train/*"), ("round", "eval/*"), ("round", "metrics/*")):
        logger.wandb.define_metric(axis)
        logger.wandb.define_metric(pattern, step_metric=axis)
    return logger


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def build_loggers(names: Sequence[str], run_dir: Path, run_name: str, cfg: dict) -> list[BaseLogger]:
    """The configured trackers, writing under the run folder unless their environment says otherwise
    (W&B: offline unless WANDB_MODE or WANDB_API_KEY is set; MLflow: $MLFLOW_TRACKING_URI)."""
    loggers: list[BaseLogger] = []
    for name in names:
        if name == "tensorboard":
            from avalanche.logging import TensorboardLogger

            loggers.append(TensorboardLogger(tb_log_dir=str(run_dir / "tensorboard")))
        elif name == "wandb":
            loggers.append(_wandb_logger(run_dir, run_name, cfg))
        elif name == "mlflow":
            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:  # MLflow 3 refuses its file store unless asked; a local store is the point here
                uri = (run_dir / "mlruns").resolve().as_uri()
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            loggers.append(MLflowLogger(uri, run_name, _flat(cfg)))
        elif name == "csv":
            loggers.append(CSVMetricsLogger(run_dir / "tracker.csv"))
        else:
            raise CfbenchError(f"unknown logger {name!r}; choose from {', '.join(TRACKERS)}")
    return loggers


def close_loggers(loggers: Sequence[BaseLogger]) -> None:
    for logger in loggers:
        if hasattr(logger, "close"):
            logger.close()
        elif hasattr(logger, "writer"):
            logger.writer.close()
        if hasattr(logger, "wandb"):
            logger.wandb.finish()


def log_values(loggers: Sequence[BaseLogger], values: dict[str, Optional[float]], step: int) -> None:
    for name, value in values.items():
        if value is None or not math.isfinite(float(value)):
            continue
        for logger in loggers:
            logger.log_single_metric(name, float(value), step)


class TrackerPlugin(SupervisedPlugin):
    """Sends the loss, the learning rate and each plugin's penalty to the trackers every step."""

    def __init__(self, loggers: Sequence[BaseLogger], plugins: Sequence[Any]):
        super().__init__()
        self.loggers, self.plugins = list(loggers), list(plugins)
        self.step = 0

    def after_training_iteration(self, strategy, **kwargs):
        self.step += 1
        values = {"train/loss": float(strategy.loss.detach()), "train/lr": strategy.optimizer.param_groups[0]["lr"]}
        for plugin in self.plugins:
            penalty = getattr(plugin, "last_penalty", None)
            if penalty is not None:
                values[f"train/penalty/{type(plugin).__name__}"] = float(penalty)
        log_values(self.loggers, values, self.step)


class Trackers:
    """The run's trackers (none by default): a training-step plugin, evaluation rounds, metrics."""

    def __init__(self, names: Sequence[str], run_dir: Path, cfg: dict):
        self.loggers = build_loggers(names, run_dir, run_dir.name, cfg) if names else []

    def plugins(self, strategy_plugins: Sequence[Any]) -> list:
        return [TrackerPlugin(self.loggers, strategy_plugins)] if self.loggers else []

    def log_round(self, step: int, cells: dict[str, dict[str, Optional[float]]]) -> None:
        """One evaluation round: step 0 = pretrained, t = after the t-th task."""
        log_values(self.loggers, {f"eval/{kind}/{name}": v for kind, row in cells.items() for name, v in row.items()},
                   step)

    def log_metrics(self, metrics: dict, step: int) -> None:
        log_values(self.loggers, {f"metrics/{kind}/{key}": v for kind, values in metrics.items()
                                  if isinstance(values, dict) for key, v in values.items()}, step)

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc) -> None:
        close_loggers(self.loggers)
