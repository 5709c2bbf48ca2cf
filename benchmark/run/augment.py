"""Training augmentation applied on the device to whole uint8 batches.

`RandomResizedCropBatch` is torchvision's RandomResizedCrop, sample by sample: crop boxes from
`RandomResizedCrop.get_params` (the global RNG, seeded per task, so --resume is exact) and the
tensor `resized_crop` with bicubic interpolation back to the batch's size -- the transform of
open_clip's train preprocessing (scale 0.9-1 there), which the official LDIFS code trains with.
It runs where the batch lives (the GPU when training there), on the cached images (shortest side
resized to the model's size, centre-cropped) rather than on the original files. Under DDP every rank
draws the boxes of the whole global batch, in order, and crops its own shard with its samples' boxes:
a global batch is cropped the same at any number of ranks (benchmark/distributed.py).

`once`: each image has one view for the whole task -- its box drawn as the task starts, for every
image of the split in order, and reused whenever the image is read (MoE-Adapters' few-shot data: the
first pass of its augmented loader stacked into a TensorDataset, finetune.py:39-64). Each rank crops
its own samples with their boxes, whatever the number of ranks.
"""
from __future__ import annotations

from typing import Optional

import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from tasks.compact import ImageStore, gather


class RandomResizedCropBatch:
    def __init__(self, scale: tuple[float, float] = (0.9, 1.0), ratio: tuple[float, float] = (0.75, 4 / 3),
                 once: bool = False):
        self.scale, self.ratio, self.once = tuple(scale), tuple(ratio), bool(once)

    def __repr__(self) -> str:
        return (f"RandomResizedCrop(scale={self.scale}, ratio={tuple(round(r, 4) for r in self.ratio)}, bicubic"
                f"{', once' if self.once else ''})")

    def views(self, images: "torch.Tensor | ImageStore") -> torch.Tensor:
        """`once`: (len(images), 4) boxes, one per image of a split (a tensor or a cache store), in order."""
        template = gather(images, slice(0, 1), "cpu")  # the size is all get_params reads
        return torch.tensor(self.crop_boxes(template, len(images)), dtype=torch.long)

    def crop_boxes(self, x: torch.Tensor, count: Optional[int] = None) -> list[tuple[int, int, int, int]]:
        """(top, left, height, width) for `count` samples of x's size (default len(x)), drawn
        exactly as torchvision draws them."""
        image = x.new_empty(x.shape[1:])  # get_params reads the size alone
        return [RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
                for _ in range(len(x) if count is None else count)]

    def __call__(self, x: torch.Tensor, total: Optional[int] = None, keep: Optional[slice] = None,
                 boxes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x cropped; with `total` and `keep`, x is the shard at positions `keep` of a global batch
        of `total`: all `total` boxes are drawn and x's samples get theirs. `boxes`: x's own (once)."""
        size = list(x.shape[-2:])
        out = torch.empty_like(x)
        if boxes is not None:
            chosen = boxes.tolist()
        else:
            drawn = self.crop_boxes(x, total)
            chosen = drawn[keep] if keep is not None else drawn
        for i, (top, left, h, w) in enumerate(chosen):
            out[i] = TF.resized_crop(x[i], top, left, h, w, size, InterpolationMode.BICUBIC, antialias=True)
        return out


def build_augment(settings) -> Optional[RandomResizedCropBatch]:
    """The augmentation an AugmentConfig names (None for `none`)."""
    if settings.kind == "rrc":
        return RandomResizedCropBatch(settings.scale, settings.ratio, settings.once)
    return None
