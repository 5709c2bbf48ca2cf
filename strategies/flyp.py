"""FLYP (Goyal et al., CVPR 2023), "finetune like you pretrain", exact to the LDIFS paper's code
(omegafragger/ldifs_code, finetune_functions.py:284-398 `finetune_flyp`, loss/clip_loss.py):

- each training image is paired with one prompt of its own class, the template drawn uniformly
  per image (datasets/common.py:19-29 `get_target_transform`: random.choice(templates));
- both towers train (finetune_functions.py:320-327: AdamW over every parameter of the CLIP);
- loss = (CE(s I T^T, arange(B)) + CE(s T I^T, arange(B))) / 2 on normalized image features I and
  text features T of the batch (clip_loss.py `ClipLoss.forward` without ground_labels: images of
  the same class are each other's negatives), s = logit_scale.exp() *as a number*
  (finetune_functions.py:364-367 passes `logit_scale2.item()`): no gradient reaches logit_scale,
  so AdamW skips it although it is in the optimizer, and it never changes;
- gradient clipping at norm 1.0, the cosine schedule with warm-up: the run's train settings (the
  `ldifs` protocol sets them as finetune_functions.py:328,370 do).

The plugin replaces the strategy's forward and loss (FastNaive's objective hook): the task's
text head (templates[0] per class) stays what the evaluation reads.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from .context import BuildContext
from .references import prompts_for


def clip_contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """(CE(s I T^T, i) + CE(s T I^T, i)) / 2, image i's positive being text i (clip_loss.py, world size 1)."""
    logits_per_image = logit_scale * image @ text.T
    logits_per_text = logit_scale * text @ image.T
    labels = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def encode_prompts(encoder, tokens: torch.Tensor) -> torch.Tensor:
    """Normalized text features of token rows, under the encoder's autocast setting."""
    dtype = encoder.autocast_dtype
    with torch.autocast(device_type=tokens.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        text = encoder.encode_text(tokens)
    return F.normalize(text.float(), dim=-1)


class PromptBank:
    """Every template of every class of a task, tokenized once: tokens[class, template]."""

    def __init__(self, tokenizer, classes: list[str], templates: list[str]):
        rows = [tokenizer([t.format(c) for t in templates]) for c in classes]
        self.tokens = torch.stack(rows)  # [C, T, context]

    @property
    def num_templates(self) -> int:
        return self.tokens.shape[1]

    def pick(self, classes: torch.Tensor, templates: torch.Tensor, device) -> torch.Tensor:
        return self.tokens[classes.cpu(), templates.cpu()].to(device)


class PromptDrawingPlugin(SupervisedPlugin):
    """The prompts of the task being trained, tokenized once per task (FLYP and FLYP-CE).
    prompts_for(task index) -> (class names, templates) of that task, as the run names them."""

    def __init__(self, prompts_for: Callable[[int], tuple[list[str], list[str]]]):
        super().__init__()
        self.prompts_for = prompts_for
        self.bank: PromptBank | None = None

    def before_training_exp(self, strategy, **kwargs):
        classes, templates = self.prompts_for(strategy.experience.current_experience)
        self.bank = PromptBank(strategy.model.encoder.tokenizer, classes, templates)


class FLYPPlugin(PromptDrawingPlugin):

    def training_forward(self, strategy) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized image features, normalized features of each image's drawn prompt)."""
        encoder = strategy.model.encoder
        labels = strategy.mb_y
        drawn = torch.randint(self.bank.num_templates, (len(labels),))  # the global RNG: seeded per task
        text = encode_prompts(encoder, self.bank.pick(labels, drawn, labels.device))
        return F.normalize(encoder(strategy.mb_x).float(), dim=-1), text

    def training_loss(self, strategy) -> torch.Tensor:
        image, text = strategy.mb_output
        return clip_contrastive_loss(image, text, strategy.model.encoder.logit_scale)


def build(ctx: BuildContext) -> list:
    return [FLYPPlugin(prompts_for(ctx))]
