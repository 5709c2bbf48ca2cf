"""EWC (Kirkpatrick et al., 2017): Avalanche's EWCPlugin, with its state made resumable."""
from avalanche.training.plugins import EWCPlugin


class EWC(EWCPlugin):
    checkpoint_attrs = ("saved_params", "importances")

    def __init__(self, ewc_lambda: float = 100.0, mode: str = "separate", decay_factor=None):
        super().__init__(ewc_lambda=ewc_lambda, mode=mode, decay_factor=decay_factor)
