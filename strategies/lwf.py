"""LwF (Li & Hoiem, 2017): Avalanche's LwFPlugin (distils every previous head), resumable."""
from avalanche.training.plugins import LwFPlugin


class LwF(LwFPlugin):
    checkpoint_attrs = ("lwf",)

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0):
        super().__init__(alpha=alpha, temperature=temperature)
