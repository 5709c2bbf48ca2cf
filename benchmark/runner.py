"""One strategy over one task sequence: Avalanche trains, the evaluators fill the matrices."""
from __future__ import annotations

import io
import json
import logging
import os
import random
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.scenarios.task_aware import with_task_labels
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from avalanche.training.plugins import EvaluationPlugin

import strategies
import tasks as task_registry

from .config import dump_config
from .errors import CfbenchError
from .evaluate import EvalDataset, RoundResult, evaluate_round, extract_features, matrix_kinds
from .models import create_model
from .multihead import MultiHeadClassifier
from .probe import fit_normalized_head
from .progress import ProgressPlugin
from .schedule import WarmupCosinePlugin
from .report import finalize_run
from .store import PRETRAINED, Matrix, atomic_write_bytes, atomic_write_json, atomic_write_text
from .training import FastNaive, configure_for_device

CHECKPOINT = "checkpoints/state.pt"
log = logging.getLogger("cfbench")
_PRETRAINED_ROUNDS: dict[str, RoundResult] = {}


def resolve_tasks(cfg: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Trained tasks and eval-only tasks; an explicit `tasks` list wins over `sequence`."""
    if cfg["tasks"]:
        trained = tuple(cfg["tasks"])
        for name in trained:
            task_registry.get_task(name)
        eval_only = tuple(cfg["eval_only"] or ())
    else:
        seq = task_registry.resolve_sequence(cfg["sequence"], cfg["data_root"])
        trained = seq.tasks
        eval_only = tuple(cfg["eval_only"]) if cfg["eval_only"] is not None else seq.eval_only
    for name in eval_only:
        task_registry.get_task(name)
    if len(set(trained)) != len(trained):
        raise CfbenchError(f"a task appears twice in the sequence {list(trained)}")
    return trained, tuple(n for n in eval_only if n not in trained)


def select_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CfbenchError("device cuda requested but no CUDA GPU is visible")
    return name


def set_threads(n: Optional[int]) -> int:
    """One deliberate intra-op thread count; oversubscribed cores made extraction 10x slower."""
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _load_splits(cfg: dict, trained: tuple[str, ...], eval_names: tuple[str, ...]):
    size, root, seed = cfg["model"]["image_size"], cfg["data_root"], cfg["seed"]
    cache = cfg["cache_dir"]
    train_splits = [task_registry.load_split(n, "train", size, root, cfg["train"]["max_train_per_class"], seed, cache)
                    for n in trained]
    eval_sets = [EvalDataset(n, task_registry.task_classes(n, root), task_registry.get_task(n).templates,
                             task_registry.load_split(n, "train", size, root, cfg["eval"]["probe_max_per_class"], seed,
                                                      cache),
                             task_registry.load_split(n, "test", size, root, cfg["eval"]["test_max_per_class"], seed,
                                                      cache))
                 for n in eval_names]
    return train_splits, eval_sets


def _benchmark(train_splits):
    # (x, y, sample index, task): the index lets plugins cache per-sample work (LDIFS's reference)
    datasets = [_make_taskaware_tensor_classification_dataset(s.x, s.y, torch.arange(len(s)), task_labels=i,
                                                              targets=s.y)
                for i, s in enumerate(train_splits)]
    return with_classes_timeline(with_task_labels(benchmark_from_datasets(train=datasets)))


def make_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum 0.9), fused where torch supports it (one kernel for all parameters:
    5x faster steps on CPU than the per-tensor loop); the arithmetic is the same."""
    params = list(model.parameters())
    cls, extra = (torch.optim.AdamW, {}) if name == "adamw" else (torch.optim.SGD, {"momentum": 0.9})
    try:
        return cls(params, lr=lr, weight_decay=weight_decay, fused=True, **extra)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without a fused kernel
        return cls(params, lr=lr, weight_decay=weight_decay, **extra)


def _optimizer(cfg: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg["train"]
    return make_optimizer(model, t["optimizer"], t["lr"], t["weight_decay"])


def _silent_evaluator() -> EvaluationPlugin:
    """The suite evaluates with its own evaluators; Avalanche's stays empty and quiet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EvaluationPlugin(loggers=[])


def _pretrained_key(cfg: dict, eval_names) -> str:
    """Everything the pretrained evaluation round depends on (strategies never do)."""
    keys = ("model", "eval", "data_root", "seed")
    return json.dumps({"cfg": {k: cfg[k] for k in keys}, "eval": list(eval_names)}, sort_keys=True)


def _add_rows(matrices: dict[str, Matrix], label: str, result: RoundResult) -> None:
    for kind, matrix in matrices.items():
        matrix.add_row(label, result.cells[kind])


def _lp_init_head(model: MultiHeadClassifier, cfg: dict, task: int, name: str, device: str) -> None:
    """Fit the task's head on the current encoder's features (train split, C chosen on val)."""
    size, root, seed, cap = cfg["model"]["image_size"], cfg["data_root"], cfg["seed"], cfg["eval"]["probe_max_per_class"]
    train = task_registry.load_split(name, "train", size, root, cap, seed, cfg["cache_dir"])
    val = task_registry.load_split(name, "val", size, root, cap, seed, cfg["cache_dir"])
    batch = cfg["eval"]["batch_size"]
    weight, bias, C = fit_normalized_head(extract_features(model.encoder, train.x, batch, device), train.y,
                                          extract_features(model.encoder, val.x, batch, device), val.y,
                                          task_registry.get_task(name).num_classes, seed=seed)
    model.ensure_head(task, len(bias)).load(weight, bias)
    log.info("LP-init head for %s: C=%g", name, C)


def _save_checkpoint(run_dir: Path, model, plugins, matrices, completed: int) -> None:
    state = {"completed": completed, "model": model.state_dict(),
             "matrices": {k: (m.rows, m.columns, m.values) for k, m in matrices.items()},
             "plugins": [{a: getattr(p, a) for a in getattr(p, "checkpoint_attrs", ())} for p in plugins]}
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(run_dir / CHECKPOINT, buf.getvalue())
    for kind, m in matrices.items():
        m.save(run_dir / "matrices" / f"{kind}.csv")
    atomic_write_json(run_dir / "progress.json", {"completed_tasks": matrices["lp"].rows[1:],
                                                  "finished": False})


def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def run_strategy(cfg: dict, strategy: str, run_dir: Path, resume: bool = False,
                 stop_after: Optional[int] = None) -> Path:
    """Train `strategy` over the sequence; `stop_after=k` ends after k tasks as an interruption would."""
    trained, eval_only = resolve_tasks(cfg)
    eval_names = trained + eval_only
    params = strategies.resolve_params(strategy, cfg["strategy_params"])
    device = select_device(cfg["device"])
    threads = set_threads(cfg["threads"])
    seed_everything(cfg["seed"])
    encoder = create_model(cfg["model"]["name"], cfg["model"]["pretrained"], cfg["model"]["image_size"],
                           cfg["model"]["freeze_bn"])
    if strategies.needs_text(strategy) and not encoder.has_text:
        raise CfbenchError(f"strategy {strategy} needs a text tower; {cfg['model']['name']} has none")
    cfg = {**cfg, "model": {**cfg["model"], "image_size": encoder.image_size}}
    run_cfg = {**cfg, "strategies": [strategy], "tasks": list(trained), "eval_only": list(eval_only),
               "strategy_params": params}
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_text(run_dir / "config.yaml", dump_config(run_cfg))
    handler = _setup_logging(run_dir)
    try:
        log.info("strategy %s, tasks %s, eval-only %s, device %s, %d threads", strategy, trained, eval_only,
                 device, threads)
        configure_for_device(encoder, device, cfg["train"]["precision"], cfg["train"]["compile"])
        model = MultiHeadClassifier(encoder).to(device)
        train_splits, eval_sets = _load_splits(cfg, trained, eval_names)
        bench = _benchmark(train_splits)
        plugins = strategies.build_plugins(strategy, params, {"data_root": cfg["data_root"], "cache_dir": cfg["cache_dir"],
                                                             "image_size": encoder.image_size, "seed": cfg["seed"]})
        naive = FastNaive(model=model, optimizer=_optimizer(cfg, model), criterion=torch.nn.CrossEntropyLoss(),
                          train_splits=train_splits,
                      train_mb_size=cfg["train"]["batch_size"], train_epochs=cfg["train"]["epochs"],
                      eval_mb_size=cfg["eval"]["batch_size"], device=device,
                      plugins=[*plugins, WarmupCosinePlugin(cfg["train"]["lr"], cfg["train"]["warmup_steps"]),
                               ProgressPlugin(trained)], evaluator=_silent_evaluator())
        matrices = {k: Matrix(columns=list(eval_names)) for k in matrix_kinds(encoder.has_text)}
        start = 0
        if resume:
            state = torch.load(run_dir / CHECKPOINT, map_location=device, weights_only=False)
            start = state["completed"]
            for t in range(start):
                model.ensure_head(t, task_registry.get_task(trained[t]).num_classes)
            model.load_state_dict(state["model"])
            for k, (rows, cols, values) in state["matrices"].items():
                matrices[k] = Matrix(rows, cols, values)
            for plugin, attrs in zip(plugins, state["plugins"]):
                for name, value in attrs.items():
                    setattr(plugin, name, value)
            naive.clock.train_exp_counter = start
            log.info("resumed after %d task(s)", start)
        else:
            key = _pretrained_key(cfg, eval_names)
            if key not in _PRETRAINED_ROUNDS:
                _PRETRAINED_ROUNDS[key] = evaluate_round(model, eval_sets, {}, device, cfg["eval"]["batch_size"],
                                                         cfg["eval"]["probe_C"], cfg["seed"], desc="eval pretrained")
            first = _PRETRAINED_ROUNDS[key]
            _add_rows(matrices, PRETRAINED, first)
        for t in range(start, len(trained)):
            if stop_after is not None and t >= stop_after:
                return run_dir
            name = trained[t]
            seed_everything(cfg["seed"] * 1000 + t)  # per-task seeding makes --resume exact
            num_classes = task_registry.get_task(name).num_classes
            model.ensure_head(t, num_classes)
            if strategies.head_init(strategy, cfg["train"]["head_init"]) == "lp":
                _lp_init_head(model, cfg, t, name, device)
            naive.train(bench.train_stream[t], eval_streams=[], reset_optimizer_state=True)
            result = evaluate_round(model, eval_sets, {trained[i]: i for i in range(t + 1)}, device,
                                    cfg["eval"]["batch_size"], cfg["eval"]["probe_C"], cfg["seed"],
                                    desc=f"eval after {name}")
            _add_rows(matrices, name, result)
            _save_checkpoint(run_dir, model, plugins, matrices, t + 1)
            log.info("after %s: lp %s", name, {k: round(v, 2) for k, v in result.cells["lp"].items()})
        finalize_run(run_dir, matrices, run_cfg, model_has_text=encoder.has_text)
        return run_dir
    finally:
        log.removeHandler(handler)
        handler.close()
