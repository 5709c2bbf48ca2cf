"""tqdm progress for training iterations, as an Avalanche plugin."""
from __future__ import annotations

from avalanche.core import SupervisedPlugin
from tqdm.auto import tqdm


class ProgressPlugin(SupervisedPlugin):
    def __init__(self, task_names):
        super().__init__()
        self.task_names = list(task_names)
        self.bar = None

    def before_training_exp(self, strategy, **kwargs):
        t = strategy.experience.current_experience
        steps = len(strategy.dataloader) * strategy.train_epochs
        self.bar = tqdm(total=steps, desc=f"train {self.task_names[t]}", leave=False, unit="step")

    def after_training_iteration(self, strategy, **kwargs):
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{strategy.loss.item():.3f}", refresh=False)

    def after_training_exp(self, strategy, **kwargs):
        self.bar.close()
        self.bar = None
