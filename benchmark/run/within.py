"""Evaluation inside each task, as an Avalanche plugin: after the update of each of `points`
evenly spaced steps, the chosen kinds are evaluated and a row is added to each curve.

The evaluation leaves training exactly as it would be without it: every random generator (Python,
NumPy, torch CPU and CUDA) is put back, and the encoder's train/eval mode too (extract_features),
so a run with curves trains the same weights as one without.
"""
from __future__ import annotations

import logging
import random
import time
from typing import Callable, Sequence

import numpy as np
import torch
from avalanche.core import SupervisedPlugin

from ..evaluation.evaluate import RoundResult
from ..evaluation.within import Curve, within_points

log = logging.getLogger("cfbench")


class WithinTaskEvaluation(SupervisedPlugin):
    """evaluate(task index) -> RoundResult of the model as it is now; curves: {kind: Curve}, which
    already hold the pretrained row and the rows of finished tasks (after --resume)."""

    def __init__(self, task_names: Sequence[str], points: int, curves: dict[str, Curve],
                 evaluate: Callable[[int], RoundResult]):
        super().__init__()
        self.task_names, self.points, self.curves, self.evaluate = list(task_names), points, curves, evaluate
        self.at: list[int] = []
        self.step = 0
        self.offset = 0

    def before_training_exp(self, strategy, **kwargs):
        steps = len(strategy.dataloader) * strategy.train_epochs
        self.at, self.step = within_points(steps, self.points), 0
        self.offset = next(iter(self.curves.values())).last_global_step
        if len(self.at) < self.points:
            log.info("within-task evaluation: %s has %d steps, so %d points instead of %d",
                     self.task_names[strategy.experience.current_experience], steps, len(self.at), self.points)

    def after_training_iteration(self, strategy, **kwargs):
        self.step += 1
        if self.step not in self.at:
            return
        t = strategy.experience.current_experience
        states = _rng_states()
        started = time.perf_counter()
        try:
            result = self.evaluate(t)
        finally:
            _restore_rng(states)
        for kind, curve in self.curves.items():
            curve.add(self.task_names[t], self.step, self.offset + self.step, result.cells[kind])
        log.info("within %s, step %d/%d: %s in %.1f s", self.task_names[t], self.step, self.at[-1],
                 ", ".join(self.curves), time.perf_counter() - started)


def _rng_states() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _restore_rng(states: tuple) -> None:
    python, numpy, cpu, cuda = states
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
