"""LDIFS: l2 distance in feature space to a frozen reference encoder (Mukhoti et al., TMLR 2024).

Loss = CE + alpha * LDIFS. Slices come from `encoder.slice_modules()` (ViT: ln_pre and the
residual stream after blocks D/4, D/2, 3D/4, D; CNN: stem and each stage). The official code
normalizes (N, L, C) slices along dim 1, the token axis; `normalize="channel"` uses C instead.

Without random augmentation inputs are deterministic, so when the strategy names each
minibatch sample's position in the experience's dataset (`strategy.mb_sample_index`, which
cfbench's FastNaive provides; never guessed from a batch field's position) the reference
encoder's normalized slices are computed once per task in one no-grad pass and looked up every
step. Any other strategy (stock Avalanche's Naive, whatever its dataset's fields) gets the
reference on the fly, on every batch. With augmentation (`strategy.train_augment`) the
reference runs on each augmented batch, as the official code does: a cached un-augmented
reference would pull the features of a crop towards those of the whole image.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from typing import Iterator, Optional, Sequence

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward
from torch import nn
from torch.utils.data import DataLoader, Subset

from benchmark.distributed import share_out

from . import slice_store

EPS = 1e-10
log = logging.getLogger("cfbench")


def _norm_dim(layout: str, normalize: str) -> int:
    if layout == "nlc":
        return 1 if normalize == "official" else 2
    if layout == "nchw":
        return 1  # channels, for both modes
    raise ValueError(f"unknown slice layout {layout!r}")


def normalize_slice(x: torch.Tensor, layout: str, normalize: str = "official") -> torch.Tensor:
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x / (_dot(x, x, _norm_dim(layout, normalize)).sqrt() + EPS)


def _dot(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-position dot product along dim, kept as a size-1 axis. (On CPU this is ~20x faster
    than torch.linalg.vector_norm / Tensor.norm along a non-innermost axis.)"""
    return torch.linalg.vecdot(a, b, dim=dim).unsqueeze(dim)


class _NormalizedDistance(torch.autograd.Function):
    """mean((a / (|a| + eps) - r)^2) with |.| along `dim` and r already normalized, in few passes.

    Per position (a vector along dim): |a/(n+eps) - r|^2 = n^2/(n+eps)^2 - 2 a.r/(n+eps) + |r|^2
    with n = |a|, so the forward needs two reductions and no full-size temporaries beyond a.r;
    the backward is one fused expression (a * coef_a + r * coef_r). The value can lose ~1e-7
    absolute to cancellation when a/n ~ r (fp32); the gradient is formed directly and does not.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, r: torch.Tensor, r2: torch.Tensor, dim: int) -> torch.Tensor:
        work = torch.promote_types(a.dtype, torch.float32)  # fp32 under autocast, fp64 stays fp64
        a32, r32 = a.to(work), r.to(work)
        n = _dot(a32, a32, dim).sqrt()
        s = _dot(a32, r32, dim)
        ne = n + EPS
        ctx.save_for_backward(a, r, n, s)
        return ((n / ne) ** 2 - 2 * s / ne + r2).sum() / a.numel()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, r, n, s = ctx.saved_tensors
        ne = n + EPS
        scale = grad / a.numel()
        coef_a = (2 * EPS / ne ** 3 + 2 * s / (n.clamp_min(1e-30) * ne ** 2)) * scale
        out = a.to(n.dtype) * coef_a
        out.addcmul_(r.to(n.dtype), (-2 / ne) * scale)
        return out.to(a.dtype), None, None, None


def squared_norms(reference: torch.Tensor, layout: str, normalize: str = "official") -> torch.Tensor:
    """|r|^2 along the normalization axis, per position (keepdim), for the fused distance."""
    r = reference.to(torch.promote_types(reference.dtype, torch.float32))
    return _dot(r, r, _norm_dim(layout, normalize))


def ldifs_distance(current: list[torch.Tensor], reference: list[torch.Tensor], layout: str,
                   normalize: str = "official", reference_normalized: bool = False,
                   reference_sq_norms: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """Mean over slices, then over the batch, of the per-sample mean squared difference of
    normalized features (for nlc: mean over C, then over L; for nchw: over C, H, W).

    reference_sq_norms: precomputed `squared_norms` of normalized references (saves a pass).
    """
    if len(current) != len(reference) or not current:
        raise ValueError(f"got {len(current)} current and {len(reference)} reference slices")
    dim = _norm_dim(layout, normalize)
    per_slice = []
    for i, (cur, ref) in enumerate(zip(current, reference)):
        ref = ref if reference_normalized else normalize_slice(ref.detach(), layout, normalize)
        r2 = reference_sq_norms[i] if reference_sq_norms is not None else squared_norms(ref, layout, normalize)
        # equal-size samples: the mean over all elements is the mean of the per-sample means
        per_slice.append(_NormalizedDistance.apply(cur, ref.detach(), r2.to(cur.device), dim))
    return torch.stack(per_slice).mean()


def _slice_output(output):
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture_slices(modules: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Collect the outputs of `modules`, in order, during the forwards inside the block."""
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(_slice_output(out))) for m in modules]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def _task_labels(sample: tuple, n: int) -> Optional[torch.Tensor]:
    """The task label of an Avalanche sample (its last field) as a batch of n, if it has one."""
    return torch.full((n,), int(sample[-1])) if len(sample) > 2 else None


class _SlicesComplete(Exception):
    """Raised by the last slice's hook: the rest of the reference forward is not needed."""


def _stop_forward(_module, _inputs, _output):
    raise _SlicesComplete


class LDIFSPlugin(SupervisedPlugin):
    """Adds alpha * LDIFS(f_theta(x), f_ref(x)) on each training batch to `strategy.loss`.

    Which features: by default the model's `.encoder`, a FoundationModel (`slice_modules()`,
    `slice_layout`); for any other Avalanche model pass `slice_modules` (names of its submodules,
    as in `model.named_modules()`) and `layout` ("nchw" or "nlc"): the reference is then a frozen
    copy of the whole model. Checked when training starts, with a message saying what is missing.
    reference: "previous" = the encoder as it was before the current task (official code's
    choice in sequences), "pretrained" = the encoder before the first task.
    cache: reuse per-sample reference slices (needs `strategy.mb_sample_index`), in RAM within
    cache_budget_mb (cache_dtype auto: float32, else float16), else memory-mapped float16 within
    cache_disk_mb; beyond both the reference runs on every batch (under the encoder's autocast).
    """

    @property
    def checkpoint_attrs(self) -> tuple[str, ...]:
        """What --resume restores: the pretrained reference. The previous task's is the encoder itself when
        the next task starts, made again there (a ViT-B/32 checkpoint half the size: 683 -> 348 MB)."""
        return ("reference_encoder",) if self.reference == "pretrained" else ()

    def __init__(self, alpha: float = 10.0, reference: str = "previous", normalize: str = "official",
                 cache: bool = True, cache_budget_mb: float = 4096.0, cache_dtype: str = "auto",
                 cache_disk_mb: float = 32768.0, slice_modules: Optional[Sequence[str]] = None,
                 layout: Optional[str] = None):
        super().__init__()
        if reference not in ("previous", "pretrained"):
            raise ValueError(f"reference must be previous or pretrained, not {reference!r}")
        if normalize not in ("official", "channel"):
            raise ValueError(f"normalize must be official or channel, not {normalize!r}")
        if cache_dtype not in slice_store.DTYPES:
            raise ValueError(f"cache_dtype must be one of {', '.join(slice_store.DTYPES)}, not {cache_dtype!r}")
        if slice_modules is not None and (not slice_modules or layout not in ("nchw", "nlc")):
            raise ValueError("slice_modules needs at least one module name and layout 'nchw' or 'nlc'")
        self.alpha, self.reference, self.normalize = float(alpha), reference, normalize
        self.cache, self.cache_budget_mb, self.cache_dtype = cache, float(cache_budget_mb), cache_dtype
        self.cache_disk_mb = float(cache_disk_mb)
        self.slice_names = list(slice_modules) if slice_modules is not None else None
        self.layout = layout
        self.reference_encoder: Optional[nn.Module] = None
        self.last_penalty: Optional[torch.Tensor] = None
        self.reference_forwards = 0  # frozen-encoder calls made inside training steps
        self.cached_samples = 0  # samples this process encoded into reference caches (once per run under DDP)
        self._cached: Optional[list[torch.Tensor]] = None
        self._cached_sq: Optional[list[torch.Tensor]] = None  # |r|^2 per position, for the fused distance
        self.cache_seconds = 0.0  # time spent building reference caches (reported by `cfbench perf`)
        self._captured: list[torch.Tensor] = []
        self._capturing = False
        self._handles: list = []

    # -- which network and which of its modules ---------------------------------------------------

    def _feature_net(self, model: nn.Module) -> nn.Module:
        return model if self.slice_names is not None else model.encoder

    def _slices_of(self, net: nn.Module) -> list[nn.Module]:
        if self.slice_names is not None:
            return [net.get_submodule(name) for name in self.slice_names]
        return net.slice_modules()

    def _layout(self, model: nn.Module) -> str:
        return self.layout if self.slice_names is not None else model.encoder.slice_layout

    def before_training(self, strategy, **kwargs):
        """The model interface, checked before the first step: what is missing, and the alternative."""
        model = strategy.model
        if self.slice_names is None:
            encoder = getattr(model, "encoder", None)
            if encoder is None or not callable(getattr(encoder, "slice_modules", None)) \
                    or getattr(encoder, "slice_layout", None) not in ("nchw", "nlc"):
                raise TypeError(f"LDIFSPlugin needs model.encoder with slice_modules() and slice_layout "
                                f"(a cfbench FoundationModel); {type(model).__name__} has none. For another "
                                "model pass slice_modules=[submodule names] and layout='nchw' or 'nlc'")
            return
        known = dict(model.named_modules())
        missing = [name for name in self.slice_names if name not in known]
        if missing:
            raise TypeError(f"LDIFSPlugin: {type(model).__name__} has no submodule(s) {missing}; "
                            f"some it has: {[n for n in known if n][:8]}")

    def before_training_exp(self, strategy, **kwargs):
        encoder = self._feature_net(strategy.model)
        if self.reference == "previous" or self.reference_encoder is None:
            # a FoundationModel's reference is its image tower alone (a CLIP's text tower is never read)
            frozen = copy.deepcopy(encoder) if self.slice_names is not None else encoder.image_tower_copy()
            self.reference_encoder = frozen.eval().requires_grad_(False)
        start = time.perf_counter()
        augmenting = getattr(strategy, "train_augment", None) is not None
        if self.cache and augmenting:
            log.info("LDIFS: training batches are augmented, so the reference runs on every batch (no cache)")
        self._cached, self._cached_sq = self._build_cache(strategy) if self.cache and not augmenting else (None, None)
        self.cache_seconds += time.perf_counter() - start
        self._handles = [m.register_forward_hook(self._hook) for m in self._slices_of(encoder)]

    @torch.no_grad()
    def _reference_slices(self, x: torch.Tensor, task_labels: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """The frozen encoder's slices; its forward stops at the last slice (what follows -- head
        convolution, pooling, projection -- is never used)."""
        modules = self._slices_of(self.reference_encoder)
        with capture_slices(modules) as slices:
            stop = modules[-1].register_forward_hook(_stop_forward)
            try:
                if self.slice_names is None:
                    self.reference_encoder(x)
                else:  # a whole Avalanche model: multi-task models take the task labels
                    avalanche_forward(self.reference_encoder, x, task_labels)
            except _SlicesComplete:
                pass
            finally:
                stop.remove()
        return slices

    def _build_cache(self, strategy) -> tuple[Optional[list[torch.Tensor]], Optional[list[torch.Tensor]]]:
        """Normalized reference slices of every sample of the experience, stored at the sample's
        position in its dataset: the key `strategy.mb_sample_index` gives at each step."""
        dataset = strategy.experience.dataset
        if len(dataset) == 0 or not isinstance(getattr(type(strategy), "mb_sample_index", None), property):
            return None, None  # the strategy names no sample positions: the reference runs on the fly
        layout = self._layout(strategy.model)
        first = dataset[0]
        probe = self._reference_slices(first[0].unsqueeze(0).to(strategy.device), _task_labels(first, 1))
        cache = slice_store.allocate(len(dataset), probe, self.cache_dtype, self.cache_budget_mb, self.cache_disk_mb)
        if cache is None:
            return None, None
        shapes = [s.shape[1:] for s in probe]
        sq = [torch.empty((len(dataset), *self._sq_shape(s, layout)), dtype=torch.float32) for s in shapes]
        batch = max(256, strategy.train_mb_size)

        def compute(k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            """Chunk k (positions k*batch onwards, in dataset order: positions are the keys)."""
            # a private generator: the training shuffle's RNG is left alone
            chunk = next(iter(DataLoader(Subset(dataset, range(k * batch, min(len(dataset), (k + 1) * batch))),
                                         batch_size=batch, generator=torch.Generator())))
            x = chunk[0].to(strategy.device)
            self.cached_samples += len(x)
            task_labels = chunk[-1].to(strategy.device) if len(chunk) > 2 else None
            out = []
            for store, ref in zip(cache, self._reference_slices(x, task_labels)):
                stored = normalize_slice(ref, layout, self.normalize).to("cpu", store.dtype)
                out.append((stored, squared_norms(stored, layout, self.normalize)))  # of what steps will read
            return out

        def keep(k: int, slices: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
            index = torch.arange(k * batch, k * batch + len(slices[0][0]))
            for store, store_sq, (stored, stored_sq) in zip(cache, sq, slices):
                store[index], store_sq[index] = stored, stored_sq

        share_out(-(-len(dataset) // batch), compute, keep)  # under DDP each chunk on one rank, then shared
        return cache, sq

    def _sq_shape(self, shape: torch.Size, layout: str) -> tuple[int, ...]:
        dim = _norm_dim(layout, self.normalize) - 1  # shape has no batch axis
        return tuple(1 if i == dim else d for i, d in enumerate(shape))

    def _hook(self, _module, _inputs, output):
        if self._capturing:
            self._captured.append(_slice_output(output))

    def before_forward(self, strategy, **kwargs):
        self._captured = []
        self._capturing = True

    def after_forward(self, strategy, **kwargs):
        self._capturing = False

    def before_backward(self, strategy, **kwargs):
        layout = self._layout(strategy.model)
        if self._cached is not None:
            index = strategy.mb_sample_index.cpu()
            device = self._captured[0].device
            reference = [c[index].to(device, non_blocking=True) for c in self._cached]
            sq = [c[index].to(device, non_blocking=True) for c in self._cached_sq]
            penalty = ldifs_distance(self._captured, reference, layout, self.normalize, reference_normalized=True,
                                     reference_sq_norms=sq)
        else:
            self.reference_forwards += 1
            reference = self._reference_slices(strategy.mb_x, getattr(strategy, "mb_task_id", None))
            penalty = ldifs_distance(self._captured, reference, layout, self.normalize)
        self.last_penalty = penalty.detach()
        # a mean over the batch: under DDP this rank's share of the global batch's mean
        strategy.loss += self.alpha * penalty * getattr(strategy, "shard_weight", 1.0)
        self._captured = []

    def after_training_exp(self, strategy, **kwargs):
        for h in self._handles:
            h.remove()
        self._handles = []
        self._cached = self._cached_sq = None
