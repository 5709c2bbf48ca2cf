"""EWC (Kirkpatrick et al., 2017): Avalanche's EWCPlugin, with its state made resumable and
frozen parameters (a CLIP's text tower) kept out of its importances and penalty."""
from avalanche.training.plugins import EWCPlugin


def _trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


class EWC(EWCPlugin):
    checkpoint_attrs = ("saved_params", "importances")

    def __init__(self, ewc_lambda: float = 100.0, mode: str = "separate", decay_factor=None):
        super().__init__(ewc_lambda=ewc_lambda, mode=mode, decay_factor=decay_factor)

    def compute_importances(self, model, *args, **kwargs):
        trainable = _trainable(model)
        return {k: v for k, v in super().compute_importances(model, *args, **kwargs).items() if k in trainable}

    def after_training_exp(self, strategy, **kwargs):
        super().after_training_exp(strategy, **kwargs)
        exp, trainable = strategy.clock.train_exp_counter, _trainable(strategy.model)
        self.saved_params[exp] = {k: v for k, v in self.saved_params[exp].items() if k in trainable}
