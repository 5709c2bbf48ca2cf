"""FLYP-CE, the LDIFS paper's cross-entropy ablation of FLYP, exact to its code
(omegafragger/ldifs_code, finetune_functions.py:401-535 `finetune_flyp_ce`):

- at every step, one template is drawn per class, uniformly (finetune_functions.py:484-490:
  torch.randint over the templates, one draw per class), over every template of the task
  (`get_templates`, :422; tokenized per class and template, :450-461);
- logits = logit_scale.exp() * normalized image features @ normalized features of the drawn class
  prompts; loss = CE(logits, labels) (:492-507);
- both towers and logit_scale train: AdamW over every parameter of the CLIP (:433-439), and the
  logits carry logit_scale's gradient (:503-506);
- gradient clipping at norm 1.0 and the cosine schedule with warm-up as the run's train settings.

The strategy trains a text head (train.head: text) so that logit_scale and the text tower are in
the optimizer; the plugin replaces the forward (drawn prompts instead of the head's templates[0])
and leaves the loss to the run's criterion (cross-entropy; train.label_smoothing stays 0 as
in the official code).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .context import BuildContext
from .flyp import PromptDrawingPlugin, encode_prompts
from .references import prompts_for


class FLYPCEPlugin(PromptDrawingPlugin):
    """Forward: logits over every class of the task, one drawn prompt each; the run's criterion (CE)."""

    def before_training(self, strategy, **kwargs):
        # the official optimizer holds logit_scale and the loss reaches it (cfbench's text heads keep
        # it frozen otherwise, as ZSCL does); Avalanche builds the task's optimizer after this hook
        strategy.model.encoder.clip.logit_scale.requires_grad_(True)

    def training_forward(self, strategy) -> torch.Tensor:
        encoder = strategy.model.encoder
        num_classes = self.bank.tokens.shape[0]
        drawn = torch.randint(self.bank.num_templates, (num_classes,))  # the global RNG: seeded per task
        text = encode_prompts(encoder, self.bank.pick(torch.arange(num_classes), drawn, strategy.mb_x.device))
        image = F.normalize(encoder(strategy.mb_x).float(), dim=-1)
        return encoder.clip.logit_scale.exp() * image @ text.T


def build(ctx: BuildContext) -> list:
    return [FLYPCEPlugin(prompts_for(ctx))]
