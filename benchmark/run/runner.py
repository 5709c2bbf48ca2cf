"""One strategy over one task sequence: Avalanche trains, the evaluators fill the matrices.

`run_strategy` reads top to bottom: resolve the tasks and the strategy's parameters, build the
encoder, the data and the learner, evaluate the pretrained model, then per task: initialise its
head, train, evaluate every dataset, checkpoint. The helpers below it each do one of those steps.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.scenarios.task_aware import with_task_labels
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from avalanche.training.plugins import EvaluationPlugin
from threadpoolctl import threadpool_limits

import strategies
import tasks as task_registry
from tasks.loading import load_split

from ..config import RunConfig, dump_config, experiment_digest
from ..config.deviations import protocol_deviations, summary
from ..config.plan import (RunPlan, check_text_needs, choose_cache_format, evaluated_references, lp_init_split,
                           make_plan, split_specs)
from ..config.templates import task_class_names, task_templates
from ..distributed import barrier, once, rank_environment, world
from ..errors import CfbenchError, ResumeRefused
from ..evaluation.evaluate import (
    EvalDataset, ProbeWork, RoundResult, ZeroShotClassifier, evaluate_round, extract_features, lp_init_weights,
    matrix_kinds
)
from ..evaluation.matrix import PRETRAINED, Matrix
from ..evaluation.multihead import MultiHeadClassifier
from ..evaluation.within import Curve
from ..files import AppendLogHandler, atomic_write_json, atomic_write_text
from ..models.factory import build_model, check_batchnorm
from ..report.compare import finalize_run
from ..report.run_folder import DEVIATIONS, clear_error, hold_run_folder
from ..report.trackers import Trackers
from .augment import build_augment
from .checkpoint import apply_checkpoint, keep_finished_checkpoint, load_checkpoint, save_checkpoint
from .schedule import GradClipPlugin, WarmupCosinePlugin
from .training import FastNaive, FiniteLossGuard, ProgressPlugin, configure_for_device
from .within import WithinTaskEvaluation

log = logging.getLogger("cfbench")
LPHead = dict  # {"weight": (classes, features), "bias": (classes,)}: plain tensors, as the checkpoint keeps them
_PRETRAINED_ROUNDS: dict[str, RoundResult] = {}


def run_strategy(cfg: RunConfig, strategy: str, run_dir: Path, resume: bool = False,
                 stop_after: Optional[int] = None, on_start: Optional[Callable[[], None]] = None,
                 plan: Optional[RunPlan] = None) -> Path:
    """Train `strategy` over the sequence (`plan`: the config's, made here unless validation made
    it); `stop_after=k` ends after k tasks as an interruption would; `on_start()` is called once
    every check has passed, just before the run folder is held."""
    cfg = cfg.for_strategy(strategy)  # its row of the protocol, if it has one (RunConfig.rows)
    plan = plan or make_plan(cfg)
    trained, eval_only = plan.trained, plan.eval_only
    ranks = world()  # several processes (torchrun): rank 0 alone writes (benchmark/distributed.py)
    strategies.check_data_parallel(strategy, ranks.size)
    params = strategies.resolve_params(strategy, cfg.strategy_params)
    # from the settings as given, before they are filled in (a resumed run's were recorded at its start)
    deviations = None if resume else protocol_deviations(cfg, [strategy])
    device = select_device(cfg.device)
    threads = set_threads(cfg.threads)
    seed_everything(cfg.seed)
    with _run_log() as log_into:  # lines logged before the run folder exists are kept for its log.txt
        encoder = build_model(cfg.model)
        strategies.adapt_model(strategy, params, encoder, _plugin_context(cfg, encoder, trained, strategy))
        check_text_needs(cfg, strategy, encoder.has_text)
        check_batchnorm(cfg.model, ranks.size, encoder)
        cfg = cfg.replace(model=replace(cfg.model, image_size=encoder.image_size), strategies=[strategy],
                          tasks=list(trained), eval_only=list(eval_only),
                          train=replace(cfg.train, head=strategies.train_head(strategy, cfg.train.head)),
                          strategy_params={**cfg.strategy_params, **params})  # all of them: config.yaml reloads as is
        cfg = cfg.replace(cache_format=choose_cache_format(cfg, trained, trained + eval_only))
        plugins = strategies.build_plugins(strategy, params, _plugin_context(cfg, encoder, trained, strategy))
        settings = cfg.to_dict()
        # a resumed run's checkpoint must be of this config (checked before the folder is touched)
        state = load_checkpoint(run_dir, settings, trained, trained + eval_only, matrix_kinds(encoder.has_text),
                                device) if resume else None
        if on_start:
            on_start()
        held = hold_run_folder(run_dir, resume, experiment_digest(settings)) if ranks.writer \
            else contextlib.nullcontext()
        with held:  # nothing is written before this point (a resumed run's: before its checkpoint is applied)
            writing = False

            def started() -> None:  # once: from here the run writes its log (and a resumed one its progress)
                nonlocal writing
                if ranks.writer and not writing:
                    writing = True
                    log_into(run_dir)
                    if resume:
                        clear_error(run_dir)

            if not resume:
                started()
            if not resume and ranks.writer:
                log.info("%s", summary(cfg, deviations))
                for line in evaluated_references(params, trained + eval_only):
                    log.warning("%s", line)
                atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
                atomic_write_json(run_dir / DEVIATIONS, [d.to_dict() for d in deviations])
            try:
                with Trackers(cfg.loggers if ranks.writer else [], run_dir, cfg.to_dict()) as trackers:
                    log.info("strategy %s (protocol %s), tasks %s, eval-only %s, device %s, %d threads, cache %s%s",
                             strategy, cfg.protocol, trained, eval_only, device, threads, cfg.cache_format,
                             f", {ranks.size} processes (DDP)" if ranks.active else "")
                    _train_sequence(cfg, strategy, encoder, plugins, run_dir, trained, eval_only, device, trackers,
                                    state, stop_after, resumed=started)
            except ResumeRefused:
                raise
            except BaseException:
                started()  # any other stop is logged and recorded, as before
                raise
    return run_dir


def _train_sequence(cfg: RunConfig, strategy: str, encoder, plugins: list, run_dir: Path, trained, eval_only,
                    device: str, trackers: Trackers, state: Optional[dict], stop_after: Optional[int],
                    resumed: Callable[[], None] = lambda: None) -> None:
    """The pretrained row (or the checkpoint's `state`), then per task: initialise its head, train,
    evaluate, checkpoint."""
    if encoder.has_text:  # frozen, bit-identical, unless the text head trains it
        encoder.set_text_trainable(cfg.train.head == "text")
    configure_for_device(encoder, device, cfg.train.precision, cfg.train.compile)
    model = MultiHeadClassifier(encoder).to(device)
    train_splits, eval_sets = _load_splits(cfg, trained, trained + eval_only)
    writer = world().writer
    pretrained_zs = _pretrained_zero_shot(cfg, encoder, eval_sets, device)
    matrices = {k: Matrix(columns=list(trained + eval_only)) for k in matrix_kinds(encoder.has_text)}
    curves = {k: Curve(list(trained + eval_only)) for k in within_kinds(cfg, encoder.has_text)}
    zs_for_eval = pretrained_zs if cfg.eval.zs_text == "pretrained" else None

    def evaluate_within(t: int) -> RoundResult:
        return evaluate_round(model, eval_sets, {trained[i]: i for i in range(t + 1)}, cfg.eval, device, cfg.seed,
                              zs_for_eval, desc=f"within {trained[t]}", kinds=list(curves))

    within = [WithinTaskEvaluation(trained, cfg.eval.within_task.points, curves, evaluate_within)] if curves else []
    learner = _learner(cfg, model, train_splits, plugins, trained, device, [*trackers.plugins(plugins), *within])
    stream = _benchmark(train_splits).train_stream
    lp_init = cfg.train.head == "linear" and strategies.head_init(strategy, cfg.train.head_init) == "lp"
    keep_probe = lp_init and lp_init_split(cfg) == ("train", cfg.eval.probe_max_per_class)  # else fitted apart

    def next_lp_head(t: int, result: RoundResult) -> Optional[LPHead]:
        """Task t's LP-init head, from the round just evaluated (the same encoder): its probe work reused."""
        if not lp_init or t >= len(trained):
            return None
        return _lp_init_head(cfg, model, trained[t], result.kept.get(trained[t]), device)

    if state is not None:
        for t in range(state["completed"]):
            _make_head(cfg, model, t, trained[t])
        start = apply_checkpoint(state, model, plugins, matrices, curves)
        resumed()  # the checkpoint fits: from here the run writes (its log, progress.json)
        next_head = state.get("next_head")  # None from an older checkpoint: fitted again, the same head
        learner.clock.train_exp_counter = start
        log.info("resumed after %d task(s)", start)
    else:
        start = 0
        # before any training the current text tower is the pretrained one: its classifiers serve
        pretrained = _pretrained_round(cfg, model, eval_sets, pretrained_zs, device,
                                       keep=trained[:1] if keep_probe else [])
        _add_rows(matrices, PRETRAINED, pretrained, trackers)
        for kind, curve in curves.items():
            curve.add(PRETRAINED, 0, 0, pretrained.cells[kind])
        next_head = next_lp_head(0, pretrained)
    for t in range(start, len(trained)):
        if stop_after is not None and t >= stop_after:
            return
        name = trained[t]
        seed_everything(cfg.seed * 1000 + t)  # per-task seeding makes --resume exact
        _init_head(cfg, strategy, model, t, name, pretrained_zs, device, next_head)
        learner.train_epochs = 1 if cfg.train.iterations else cfg.train.epochs_for(name)
        learner.train(stream[t], eval_streams=[], reset_optimizer_state=True)
        result = evaluate_round(model, eval_sets, {trained[i]: i for i in range(t + 1)}, cfg.eval, device,
                                cfg.seed, zs_for_eval, desc=f"eval after {name}",
                                keep=trained[t + 1:t + 2] if keep_probe else [])
        _add_rows(matrices, name, result, trackers)
        next_head = next_lp_head(t + 1, result)
        if writer:
            save_checkpoint(run_dir, cfg.to_dict(), model, plugins, matrices, t + 1, curves, next_head)
        log.info("after %s: lp %s", name, {k: round(v, 2) for k, v in result.cells["lp"].items()})
    if writer:
        metrics = finalize_run(run_dir, matrices, cfg.to_dict(), model_has_text=encoder.has_text, curves=curves)
        keep_finished_checkpoint(run_dir, cfg.checkpoints, model)
        trackers.log_metrics(metrics, len(trained))


def within_kinds(cfg: RunConfig, has_text: bool) -> list[str]:
    """The kinds evaluated inside each task, cheapest first (zs and head read test features only);
    none when eval.within_task is off."""
    wanted = set(cfg.eval.within_task.kinds) if cfg.eval.within_task.points else set()
    return [k for k in ("zs", "head", "lp") if k in wanted and (k != "zs" or has_text)]


def _plugin_context(cfg: RunConfig, encoder, trained: tuple[str, ...], strategy: str) -> strategies.BuildContext:
    return strategies.BuildContext(
        train_head=strategies.train_head(strategy, cfg.train.head),
        image_size=encoder.image_size, seed=cfg.seed, data_root=cfg.data_root, cache_dir=cfg.cache_dir,
        cache_format=cfg.cache_format, tasks=trained, train_split=cfg.train.split,
        train_cap=cfg.train.max_train_per_class,
        template_of=lambda n: task_templates(n, cfg.eval.templates)[0],
        templates_of=lambda n: list(task_templates(n, cfg.eval.templates)),
        classes_of=lambda n: task_class_names(n, cfg.data_root, cfg.eval.classnames),
        tokenizer=getattr(encoder, "tokenizer", None))


def select_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CfbenchError("device cuda requested but no CUDA GPU is visible")
    return name


def set_threads(n: Optional[int]) -> int:
    """One deliberate intra-op thread count; oversubscribed cores made extraction 10x slower. The
    default is every core, shared out among the processes of one machine under torchrun."""
    n = n or max(1, (os.cpu_count() or 1) // rank_environment().get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(n)
    if world().active:  # and the probes' BLAS: N processes of every core each spin-wait on each other
        threadpool_limits(n)
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _split(cfg: RunConfig, name: str, split: str, cap: Optional[int]) -> task_registry.TensorSplit:
    return load_split(name, split, cfg.model.image_size, cfg.data_root, cap, cfg.seed, cfg.cache_dir,
                                    cfg.cache_format)


def _load_splits(cfg: RunConfig, trained: tuple[str, ...], eval_names: tuple[str, ...]):
    with first_on_each_machine():  # one process per machine fills the cache, the others then read it
        return _read_splits(cfg, trained, eval_names)


@contextlib.contextmanager
def first_on_each_machine() -> Iterator[None]:
    """The block runs on each machine's first process, then on the others."""
    first = world().local_rank == 0
    if not first:
        barrier()
    yield
    if first:
        barrier()


def _read_splits(cfg: RunConfig, trained: tuple[str, ...], eval_names: tuple[str, ...]):
    train, evals = split_specs(cfg, trained, eval_names)
    train_splits = [_split(cfg, *spec) for spec in train]
    eval_sets = [EvalDataset(n, task_class_names(n, cfg.data_root, cfg.eval.classnames),
                             task_templates(n, cfg.eval.templates), *[_split(cfg, *spec) for spec in evals[n]],
                             refit_on_val="val" not in task_registry.loaded_task(n, cfg.data_root).splits)
                 for n in eval_names]
    return train_splits, eval_sets


def _pretrained_zero_shot(cfg: RunConfig, encoder, eval_sets: list[EvalDataset],
                          device: str) -> Optional[dict[str, ZeroShotClassifier]]:
    """Zero-shot classifiers of the pretrained text tower (built before any training or --resume
    load): the evaluation's under eval.zs_text pretrained, and the ZS-init heads' weights."""
    if not encoder.has_text:
        return None
    return {ds.name: ZeroShotClassifier.build(encoder, ds, device) for ds in eval_sets}


def _benchmark(train_splits):
    # (x, y, sample index, task): the index lets plugins cache per-sample work (LDIFS's reference)
    datasets = [_make_taskaware_tensor_classification_dataset(s.x, s.y, torch.arange(len(s)), task_labels=i,
                                                              targets=s.y)
                for i, s in enumerate(train_splits)]
    return with_classes_timeline(with_task_labels(benchmark_from_datasets(train=datasets)))


def make_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW or SGD (with `momentum`) over the parameters that train, fused where torch supports it
    (one kernel for all parameters: 5x faster steps on CPU than the per-tensor loop); the arithmetic
    is the same."""
    params = [p for p in model.parameters() if p.requires_grad]
    cls, extra = (torch.optim.AdamW, {}) if name == "adamw" else (torch.optim.SGD, {"momentum": momentum})
    try:
        return cls(params, lr=lr, weight_decay=weight_decay, fused=True, **extra)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without a fused kernel
        return cls(params, lr=lr, weight_decay=weight_decay, **extra)


def _silent_evaluator() -> EvaluationPlugin:
    """The suite evaluates with its own evaluators; Avalanche's stays empty and quiet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EvaluationPlugin(loggers=[])


def _learner(cfg: RunConfig, model, train_splits, plugins: list, trained, device: str,
             observers: Sequence = ()) -> FastNaive:
    t = cfg.train
    lrs = [t.lr_for(name) for name in trained]
    controls = [WarmupCosinePlugin(lrs, t.warmup_steps, t.schedule_steps, t.lr_floor)]
    controls += [GradClipPlugin(t.grad_clip)] if t.grad_clip else []
    optimizer = make_optimizer(model, t.optimizer, lrs[0] if lrs else 0.0, t.weight_decay, t.momentum)
    return FastNaive(model=model, optimizer=optimizer,
                     criterion=torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing),
                     train_splits=train_splits, train_steps=t.iterations,
                     train_augment=build_augment(t.augment), train_mb_size=t.batch_size, train_epochs=1,
                     eval_mb_size=cfg.eval.batch_size, device=device,
                     plugins=[*plugins, *controls, ProgressPlugin(trained), *observers, FiniteLossGuard(trained)],
                     evaluator=_silent_evaluator())


def _pretrained_round(cfg: RunConfig, model, eval_sets, zero_shot, device: str, keep: Sequence[str]) -> RoundResult:
    """The pretrained row, shared by every strategy of one invocation (it depends on no strategy);
    the probe work of `keep` is kept by the strategy that evaluates it first. Keyed by everything the
    row is computed from, the cache format included: a compact run in the same process as a raw one
    evaluates its own images."""
    settings = cfg.to_dict()
    key = json.dumps({"model": settings["model"], "eval": settings["eval"], "data_root": cfg.data_root,
                      "cache_format": cfg.cache_format, "seed": cfg.seed,
                      "datasets": [d.name for d in eval_sets]}, sort_keys=True)
    if key not in _PRETRAINED_ROUNDS:
        _PRETRAINED_ROUNDS[key] = evaluate_round(model, eval_sets, {}, cfg.eval, device, cfg.seed, zero_shot,
                                                 desc="eval pretrained", keep=keep)
    return _PRETRAINED_ROUNDS[key]


def _add_rows(matrices: dict[str, Matrix], label: str, result: RoundResult, trackers: Trackers) -> None:
    for kind, matrix in matrices.items():
        matrix.add_row(label, result.cells[kind])
    trackers.log_round(len(matrices["lp"].rows) - 1, {kind: result.cells[kind] for kind in matrices})


def _init_head(cfg: RunConfig, strategy: str, model: MultiHeadClassifier, task: int, name: str,
               pretrained_zs: Optional[dict[str, ZeroShotClassifier]], device: str,
               prepared: Optional[LPHead] = None) -> None:
    """The task's head before training: a text head (the current text tower over one prompt per
    class), or a linear head with LP-init (`prepared` after the previous round, else a probe on the
    current encoder's features), ZS-init (the pretrained text tower's class embeddings x
    logit_scale.exp(), ldifs_code model/heads.py:17-61) or zero."""
    head = _make_head(cfg, model, task, name)
    how = strategies.head_init(strategy, cfg.train.head_init) if cfg.train.head == "linear" else "none"
    if how == "zs":
        zs = pretrained_zs[name]
        head.load(zs.weights * zs.logit_scale, torch.zeros(len(zs.weights)))
        log.info("ZS-init head for %s (pretrained text tower, logit scale %.2f)", name, zs.logit_scale)
    elif how == "lp":
        weights = prepared or _lp_init_head(cfg, model, name, None, device)
        head.load(weights["weight"], weights["bias"])


def _lp_init_head(cfg: RunConfig, model: MultiHeadClassifier, name: str, kept: Optional[ProbeWork],
                  device: str) -> LPHead:
    """LP-init weights for task `name` from the current encoder: the evaluation round's probe work
    when it was kept (the same features, the official probe's lr search), else features of the
    images `lp_init_split` names, extracted here; the val features the round's probe did not need
    (sklearn) are extracted here."""
    batch = cfg.eval.batch_size
    if kept is None:
        train = _split(cfg, name, *lp_init_split(cfg))
        kept = ProbeWork(extract_features(model.encoder, train.x, batch, device), train.y)
    if kept.val_f is None:
        val = _split(cfg, name, "val", cfg.eval.probe_max_per_class)
        kept.val_f, kept.val_y = extract_features(model.encoder, val.x, batch, device), val.y
    weight, bias, how = once(lambda: lp_init_weights(cfg.eval, kept, task_registry.get_task(name).num_classes,
                                                     cfg.seed, device))  # fitted by rank 0 alone under DDP
    log.info("LP-init head for %s: %s", name, how)
    return {"weight": weight, "bias": bias}


def _make_head(cfg: RunConfig, model: MultiHeadClassifier, task: int, name: str):
    if cfg.train.head == "text":
        template = task_templates(name, cfg.eval.templates)[0]  # ZSCL trains with one prompt per class
        classes = task_class_names(name, cfg.data_root, cfg.eval.classnames)
        return model.ensure_text_head(task, [template.format(c) for c in classes])
    return model.ensure_head(task, task_registry.get_task(name).num_classes)


class _Pending(logging.Handler):
    """Holds records until the run folder exists."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _run_log() -> Iterator[Callable[[Path], None]]:
    """Yields `log_into(run_dir)`: from then on (and for what was logged before) the run's log.txt.
    A CfbenchError raised inside -- the one line the user sees -- goes into log.txt too."""
    pending, handlers = _Pending(), []
    log.addHandler(pending)
    log.setLevel(logging.INFO)

    def log_into(run_dir: Path) -> None:
        handler = AppendLogHandler(run_dir / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        for record in pending.records:
            handler.handle(record)
        log.removeHandler(pending)
        log.addHandler(handler)
        handlers.append(handler)

    try:
        yield log_into
    except CfbenchError as err:
        if handlers:
            log.error("error: %s", err)
        raise
    finally:
        for handler in [pending, *handlers]:
            log.removeHandler(handler)
            handler.close()
