"""LwF (Li & Hoiem, 2017): Avalanche's LwFPlugin (distils every previous head), resumable."""
from avalanche.training.plugins import LwFPlugin


class LwF(LwFPlugin):
    checkpoint_attrs = ("lwf",)

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0):
        super().__init__(alpha=alpha, temperature=temperature)

    def before_backward(self, strategy, **kwargs):
        """Avalanche's distillation term, a mean over the batch: under DDP this rank's share of the
        global batch's mean (`shard_weight`, 1 in one process)."""
        penalty = self.lwf(strategy.mb_x, strategy.mb_output, strategy.model)
        strategy.loss += penalty * getattr(strategy, "shard_weight", 1.0)
