"""EWC (Kirkpatrick et al., 2017): Avalanche's EWCPlugin, with its state made resumable and
frozen parameters (a CLIP's text tower) kept out of its importances and penalty. Under DDP the
importances' minibatches are shared out among the ranks and their sums added up over them."""
import math

from avalanche.training.plugins import EWCPlugin

from benchmark.distributed import all_reduce_sum, owned_chunks, world


def _trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


class EWC(EWCPlugin):
    checkpoint_attrs = ("saved_params", "importances")

    def __init__(self, ewc_lambda: float = 100.0, mode: str = "separate", decay_factor: float = 1.0):
        # Avalanche refuses a decay factor in separate mode and asks for one in online mode
        super().__init__(ewc_lambda=ewc_lambda, mode=mode, decay_factor=decay_factor if mode == "online" else None)

    def compute_importances(self, model, criterion, optimizer, dataset, device, batch_size, *args, **kwargs):
        ranks = world()
        if ranks.active:  # Avalanche's mean over minibatches of squared gradients = (sum over ranks) / count
            count = math.ceil(len(dataset) / batch_size)
            mine = owned_chunks(count, ranks)
            local = dataset.subset([i for k in mine for i in range(k * batch_size, min(len(dataset),
                                                                                        (k + 1) * batch_size))])
            found = super().compute_importances(model, criterion, optimizer, local, device, batch_size, *args,
                                                **kwargs)
            for imp in found.values():
                imp.data.mul_(len(mine) / count) if len(mine) else imp.data.zero_()  # 0 / 0 without chunks
            all_reduce_sum([imp.data for imp in found.values()])
        else:
            found = super().compute_importances(model, criterion, optimizer, dataset, device, batch_size, *args,
                                                **kwargs)
        trainable = _trainable(model)
        return {k: v for k, v in found.items() if k in trainable}

    def after_training_exp(self, strategy, **kwargs):
        super().after_training_exp(strategy, **kwargs)
        exp, trainable = strategy.clock.train_exp_counter, _trainable(strategy.model)
        self.saved_params[exp] = {k: v for k, v in self.saved_params[exp].items() if k in trainable}
