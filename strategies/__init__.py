"""Strategy registry. A strategy is a list of Avalanche plugins built from named parameters;
`a+b` composes strategies. To add one: copy a module here, register it below, copy its test.

The registry is data: a spec names its plugin class or builder as "module:attribute" of this
package, imported only when a run builds the strategy. Listing, parsing and checking strategies
(`cfbench list`, `run --check`, a sweep's driver) import neither torch nor Avalanche."""
from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from benchmark.errors import CfbenchError
from benchmark.files import read_text

from .context import BuildContext


@dataclass(frozen=True)
class Allowed:
    """A parameter's admissible values, checked before a run starts: bounds and/or choices."""

    min: Optional[float] = None    # inclusive
    above: Optional[float] = None  # exclusive
    max: Optional[float] = None    # inclusive
    choices: tuple = ()

    def describe(self) -> str:
        if self.choices:
            return " | ".join(map(str, self.choices))
        parts = ([f">= {self.min:g}"] if self.min is not None else []) + \
                ([f"> {self.above:g}"] if self.above is not None else []) + \
                ([f"<= {self.max:g}"] if self.max is not None else [])
        return ", ".join(parts)

    def violation(self, value: Any) -> Optional[str]:
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if self.min is not None and value < self.min:
            return f"must be >= {self.min:g}"
        if self.above is not None and value <= self.above:
            return f"must be > {self.above:g}"
        if self.max is not None and value > self.max:
            return f"must be <= {self.max:g}"
        return None


NON_NEGATIVE, POSITIVE, AT_LEAST_ONE, FRACTION = Allowed(min=0), Allowed(above=0), Allowed(min=1), Allowed(min=0, max=1)
INT_MAX = 2 ** 31 - 1


LDIFS_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")  # strategies/slice_store.DTYPES
ICARL_SELECTIONS = ("official", "herding")                       # strategies/icarl.SELECTIONS

Builder = Union[str, Callable[..., list], None]


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy is, read without importing it. `plugin` ("module:Class" of this package):
    one plugin built from the parameters alone; `build` ("module:function", or a callable):
    build(context: BuildContext, **params) -> plugins (strategies/context.py says what a context
    holds); neither: the strategy adds no plugin (FT)."""

    name: str
    description: str
    build: Builder = None
    defaults: dict[str, Any] = field(default_factory=dict)
    needs_text: bool = False
    head_init: Optional[str] = None  # overrides train.head_init (LP-FT: always "lp")
    head: Optional[str] = None  # overrides train.head (FLYP trains both towers: always "text")
    # what of the training step the strategy replaces ("forward", "loss", "parameters": adapters train
    # instead of the encoder): two components may not
    # replace the same; "output" readers (LwF distils mb_output) cannot follow a replaced forward
    replaces: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    notes: str = ""  # shown by `cfbench list strategies`
    plugin: Optional[str] = None
    # parameters that size resources on this machine, not the method (left out of a run's deviations)
    machine: tuple[str, ...] = ()
    # {parameter: Allowed}: every value the method refuses (a negative weight would train to the
    # end); checked before a run starts, and the plugin's own constructor refuses no value it passes
    allowed: dict[str, Allowed] = field(default_factory=dict)
    # why the strategy cannot train one run over several processes (None: it can, exactly)
    not_data_parallel: Optional[str] = None
    # "module:function" installing parameter-efficient modules into the built encoder before anything
    # else sees it: function(encoder, context, **params); what trains is then the adapters alone
    adapts: Optional[str] = None
    # evaluation chooses a task per batch (MoE-Adapters' selector, DIKI's Gaussians) for both towers
    routes_eval_batches: bool = False

    def make(self, context: BuildContext, **params) -> list:
        """The strategy's plugins for one run (imports the strategy's module)."""
        if self.build is not None:
            return (load(self.build) if isinstance(self.build, str) else self.build)(context, **params)
        return [load(self.plugin)(**params)] if self.plugin else []


def load(reference: str) -> Any:
    """"module:attribute" of this package, imported now: a run that builds a strategy pays for
    torch and Avalanche, a listing does not."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), attribute)


STRATEGIES: dict[str, StrategySpec] = {}
log = logging.getLogger("cfbench")


def register_strategy(spec: StrategySpec) -> StrategySpec:
    STRATEGIES[spec.name] = spec
    return spec


register_strategy(StrategySpec("ft", "cross-entropy fine-tuning (head initialised as configured)"))
register_strategy(StrategySpec("lpft", "LP-FT: head fitted on frozen-encoder features (LP-init), then FT",
                               head_init="lp"))
register_strategy(StrategySpec("ldifs", "CE + alpha * feature-space distance to a frozen reference encoder",
                               plugin="ldifs:LDIFSPlugin",
                               defaults={"alpha": 10.0, "reference": "previous", "normalize": "official",
                                         "cache": True, "cache_budget_mb": 4096.0, "cache_dtype": "auto",
                                         "cache_disk_mb": 32768.0},
                               notes="with train.augment on, the reference runs on every augmented batch "
                                     "(the per-sample cache holds un-augmented inputs and is not used)",
                               machine=("cache", "cache_budget_mb", "cache_disk_mb"),
                               allowed={"alpha": NON_NEGATIVE, "reference": Allowed(choices=("previous", "pretrained")),
                                        "normalize": Allowed(choices=("official", "channel")),
                                        "cache_dtype": Allowed(choices=LDIFS_CACHE_DTYPES),
                                        "cache_budget_mb": NON_NEGATIVE, "cache_disk_mb": NON_NEGATIVE}))
register_strategy(StrategySpec("l2sp", "CE + alpha * squared l2 distance of encoder weights to a reference",
                               plugin="l2sp:L2SPPlugin", defaults={"alpha": 0.5, "reference": "previous"},
                               allowed={"alpha": NON_NEGATIVE, "reference": Allowed(choices=("previous", "pretrained"))}))
register_strategy(StrategySpec("ewc", "Avalanche EWCPlugin (Fisher-weighted weight penalty)",
                               plugin="ewc:EWC", defaults={"ewc_lambda": 100.0, "mode": "separate",
                                                           "decay_factor": 1.0},
                               notes="decay_factor (Avalanche's: the old importances' weight when a task's are "
                                     "added) is read in mode online only",
                               allowed={"ewc_lambda": NON_NEGATIVE, "mode": Allowed(choices=("separate", "online")),
                                        "decay_factor": FRACTION}))
register_strategy(StrategySpec("lwf", "Avalanche LwFPlugin (distil previous heads' outputs)",
                               plugin="lwf:LwF", defaults={"alpha": 1.0, "temperature": 2.0}, reads=("output",),
                               allowed={"alpha": NON_NEGATIVE, "temperature": POSITIVE}))
register_strategy(StrategySpec("wise-ft", "after each task interpolate weights: (1-beta) before + beta after",
                               plugin="wise_ft:WiSEFTPlugin", defaults={"beta": 0.5}, allowed={"beta": FRACTION}))

register_strategy(StrategySpec("ls", "cross-entropy with smoothed labels (the LDIFS code's --finetune-loss ls)",
                               plugin="label_smoothing:LabelSmoothingPlugin", defaults={"smoothing": 0.1},
                               replaces=("loss",),
                               notes="the official --ls-factor default is 0.0 (= ft); 0.1 is cfbench's, not the "
                                     "paper's: set the factor you compare",
                               allowed={"smoothing": Allowed(min=0, max=0.999)}))
register_strategy(StrategySpec("flyp", "FLYP: CLIP's contrastive loss between each image and a prompt of its class, "
                               "both towers trained", "flyp:build",
                               needs_text=True, head="text", replaces=("forward", "loss"),
                               not_data_parallel="its contrastive loss couples every image of the batch with every "
                                                 "prompt, which a rank's shard does not see",
                               notes="logit_scale is used as a number (the official .item()): it never trains; "
                                     "the text head (templates[0]) is only evaluated"))
register_strategy(StrategySpec("flyp-ce", "FLYP-CE: cross-entropy over one randomly drawn prompt per class, both "
                               "towers and logit_scale trained", "flyp_ce:build", needs_text=True, head="text",
                               not_data_parallel="it replaces the training forward, which DistributedDataParallel "
                                                 "must run",
                               replaces=("forward",)))

CAPTIONS_BYTES = 256 * 1024 ** 2  # Conceptual Captions' 3.3 M training captions are ~190 MB


def read_captions(path: str) -> list[str]:
    """One caption per line; blank lines skipped."""
    lines = read_text(Path(path), "reference_texts file", limit=CAPTIONS_BYTES).splitlines()
    captions = [line.strip() for line in lines if line.strip()]
    if not captions:
        raise CfbenchError(f"zscl reference_texts {path}: no captions in it")
    return captions


register_strategy(StrategySpec("zscl", "distil the initial CLIP on a reference set, l2 to the previous weights, "
                               "weight ensembling", "zscl:build",
                               {"reference_task": "photo_patches", "reference_texts": None,
                                "temperature": 2.0, "weight": 1.0, "text_loss": False, "l2": 0.0,
                                "avg_freq": 100, "ref_batch_size": 64, "weight_ensemble": True,
                                "feature_budget_mb": 2048.0},
                               needs_text=True, machine=("feature_budget_mb",),
                               notes="teacher features of the reference set are kept float32 within "
                                     "feature_budget_mb, else float16 (ImageNet's: 1.3 GB)",
                               allowed={"temperature": POSITIVE, "weight": NON_NEGATIVE, "l2": NON_NEGATIVE,
                                        "avg_freq": AT_LEAST_ONE, "ref_batch_size": AT_LEAST_ONE,
                                        "feature_budget_mb": NON_NEGATIVE}))
_LWF_CLIP_ALLOWED = {"temperature": POSITIVE, "weight": NON_NEGATIVE, "ref_batch_size": AT_LEAST_ONE}
register_strategy(StrategySpec("lwf-clip", "ZSCL's LwF baseline: distil the previous model on the current task's "
                               "images and class prompts (image and text side)", "zscl:build_lwf_clip",
                               {"temperature": 2.0, "weight": 1.0, "text_loss": True, "ref_batch_size": 64},
                               needs_text=True, allowed=_LWF_CLIP_ALLOWED))
register_strategy(StrategySpec("lwf-vr", "ZSCL's LwF-VR baseline: lwf-clip with random token sequences (1,000 of "
                               "10 tokens per task) as the reference texts", "zscl:build_lwf_vr",
                               {"temperature": 2.0, "weight": 1.0, "text_loss": True, "ref_batch_size": 64},
                               needs_text=True, allowed=_LWF_CLIP_ALLOWED))

# ZSCL's iCaRL baseline (scripts/icarl.sh; strategies/icarl.py cites every value). Exemplars: positions in the
# images each task trains on (its cached, un-augmented, capped `train.split`); distillation texts: its class prompts.
register_strategy(StrategySpec("icarl", "ZSCL's iCaRL baseline: a memory of the previous tasks' images (herding) on "
                               "which the pretrained CLIP is distilled against the current task's class prompts",
                               "icarl:build",
                               {"memory_size": 10000, "max_candidates": 30000, "selection": "official",
                                "temperature": 2.0, "weight": 1.0, "text_loss": True, "ref_batch_size": 64},
                               needs_text=True,
                               not_data_parallel="its exemplar selection (herding over features) is not yet shared "
                                                 "out among ranks",
                               notes="the memory is per task, not per class: K = memory_size, after task t the older "
                                     "tasks keep K // t, the new one K - K // t (the official arithmetic); "
                                     "selection official stores the image at the herding pick's position in the "
                                     "shrinking feature array, as the released code does (herding: the picked one); "
                                     "scripts/icarl.sh passes neither --image_loss nor --text_loss (as committed its "
                                     "distillation is never added): weight 1 and text_loss true are lwf.sh's and "
                                     "ZSCL.sh's",
                               allowed={"memory_size": AT_LEAST_ONE, "max_candidates": AT_LEAST_ONE,
                                        "selection": Allowed(choices=ICARL_SELECTIONS), "temperature": POSITIVE,
                                        "weight": NON_NEGATIVE, "ref_batch_size": AT_LEAST_ONE}))


# the 2024 rows: parameter-efficient modules on a frozen encoder (benchmark/models/adapters)
register_strategy(StrategySpec("lora", "LoRA: the encoder frozen, a low-rank update scale * B A trained in its "
                               "attention and MLP projections (ViT) or ungrouped convolutions (CNN)", "lora:build",
                               {"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "auto", "towers": "auto",
                                "merge": False},
                               adapts="lora:install", replaces=("parameters",),
                               notes="scale = alpha / rank; target_modules auto or a regular expression fully "
                                     "matching module names (`named_modules()` of the encoder); towers auto: the "
                                     "image tower, and the text tower when train.head is text; merge: fold B A "
                                     "into the weights after each task and start a fresh adapter; dropout acts on "
                                     "Linear and Conv2d targets (attention's update is a weight delta, as in peft); "
                                     "with wise-ft set merge true (interpolating A and B is not interpolating B A)",
                               allowed={"rank": AT_LEAST_ONE, "alpha": POSITIVE, "dropout": Allowed(min=0, max=0.999),
                                        "towers": Allowed(choices=("auto", "image", "both"))}))

register_strategy(StrategySpec("moe-adapters", "MoE-Adapters (CVPR 2024): CLIP frozen, per block of both towers 22 "
                               "adapter experts beside the MLP with per-task noisy top-2 routers; the most used "
                               "experts frozen after each task; an autoencoder selector picks each eval batch's "
                               "router or zero-shot CLIP", "moe_adapters:build",
                               {"experts": 22, "top_k": 2, "freeze_top": 2, "bottleneck": 64, "extractor": "alexnet",
                                "threshold": 0.0655, "reference_task": None, "reference_iterations": 1000,
                                "selector_iterations": 300, "selector_batch_size": 64, "selector_lr": 0.01,
                                "selector_lr_decay": True, "selector_epoch": "trained"},
                               adapts="moe_adapters:install", replaces=("parameters", "forward"), needs_text=True,
                               head="text", routes_eval_batches=True,
                               not_data_parallel="its routers draw gating noise per sample from each process's own "
                                                 "generator, and evaluation routes whole batches",
                               notes="extractor alexnet needs torchvision's AlexNet ImageNet weights cached (the "
                                     "official selector); clip: the frozen CLIP image embedding (not the paper's; "
                                     "set threshold for it); alexnet-random: tests only. reference_task: the "
                                     "selector's zero-shot slot (TinyImageNet officially; null: left untrained). "
                                     "Accuracy depends on eval.batch_size: the selector picks one task per batch. "
                                     "selector_epoch: what an epoch of the selector's lr decay counts, the batches of "
                                     "the images it fits (trained) or of the task's whole train split (split: the "
                                     "few-shot script)",
                               allowed={"experts": AT_LEAST_ONE, "top_k": AT_LEAST_ONE, "freeze_top": NON_NEGATIVE,
                                        "bottleneck": AT_LEAST_ONE, "threshold": POSITIVE,
                                        "extractor": Allowed(choices=("alexnet", "clip", "alexnet-random")),
                                        "reference_iterations": NON_NEGATIVE, "selector_iterations": NON_NEGATIVE,
                                        "selector_batch_size": AT_LEAST_ONE, "selector_lr": POSITIVE,
                                        "selector_epoch": Allowed(choices=("trained", "split"))}))

register_strategy(StrategySpec("diki", "DIKI (ECCV 2024): CLIP frozen, per-task prefix keys and values in the first "
                               "blocks of both towers behind their own softmax, added before out_proj; per-task "
                               "Gaussians on frozen CLIP features pick each eval batch's prefix and weigh it per "
                               "sample", "diki:build",
                               {"depth": 8, "length": 8, "calibration_scale": 512.0, "calibration_shift": 1.0,
                                "best_epoch": True, "val_per_class": 0},
                               adapts="diki:install", replaces=("parameters",), needs_text=True, head="text",
                               routes_eval_batches=True,
                               not_data_parallel="its best epoch is chosen on a validation pass and evaluation "
                                                 "routes whole batches, neither shared out among ranks yet",
                               notes="calibration weight sigmoid(log-likelihood / calibration_scale - "
                                     "calibration_shift) (the official 512 and 1); best_epoch: keep the prefixes of "
                                     "the epoch best on the task's validation split (val_per_class images of "
                                     "each class; 0: all of it). "
                                     "Accuracy depends on "
                                     "eval.batch_size: one prefix per batch (its majority task)",
                               allowed={"depth": AT_LEAST_ONE, "length": AT_LEAST_ONE, "calibration_scale": POSITIVE,
                                        "val_per_class": NON_NEGATIVE}))


def parse_strategy(combo: str) -> list[StrategySpec]:
    names = [n.strip().lower() for n in combo.split("+") if n.strip()]
    if not names:
        raise CfbenchError("empty strategy name")
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise CfbenchError(f"unknown strategy {unknown[0]!r}; known: {', '.join(STRATEGIES)} (combine with +)")
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice:
        raise CfbenchError(f"{combo}: names {twice} twice; a combination holds each component once (set its "
                           f"weight in strategy_params.{twice} instead)")
    specs = [STRATEGIES[n] for n in names]
    for part in ("forward", "loss", "parameters"):
        owners = [s.name for s in specs if part in s.replaces]
        if len(owners) > 1:
            raise CfbenchError(f"{combo}: {' and '.join(owners)} both replace the training {part}; combine at most one")
    readers = [s.name for s in specs if "output" in s.reads]
    if readers and any("forward" in s.replaces for s in specs):
        raise CfbenchError(f"{combo}: {readers[0]} distils the head's outputs, which "
                           f"{next(s.name for s in specs if 'forward' in s.replaces)} does not compute")
    return specs


def check_data_parallel(combo: str, processes: int) -> None:
    """Refuses, before anything is written, a strategy that cannot train over `processes` > 1."""
    for spec in parse_strategy(combo):
        if processes > 1 and spec.not_data_parallel:
            raise CfbenchError(f"{spec.name} cannot train over {processes} processes: {spec.not_data_parallel}; "
                               "run it in one process")


def resolve_params(combo: str, overrides: dict[str, dict]) -> dict[str, dict]:
    """Each component's defaults updated by the config's `strategy_params[name]`."""
    resolved = {}
    for spec in parse_strategy(combo):
        given = dict(overrides.get(spec.name) or {})
        unknown = set(given) - set(spec.defaults)
        if unknown:
            raise CfbenchError(f"strategy {spec.name}: unknown parameter(s) {sorted(unknown)}; "
                               f"accepted: {sorted(spec.defaults) or 'none'}")
        resolved[spec.name] = {**spec.defaults, **{k: _typed(spec, k, v) for k, v in given.items()}}
    return resolved


def _typed(spec: StrategySpec, key: str, value: Any) -> Any:
    """value checked against the type of the parameter's default (int widens to float; a None
    default takes a string or None)."""
    default = spec.defaults[key]
    kind = type(default)
    if default is None:
        ok = value is None or isinstance(value, str)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        expected = "a string or null" if default is None else {bool: "true or false", float: "a number",
                                                               int: "an integer", str: "a string"}.get(kind, kind.__name__)
        raise CfbenchError(f"strategy_params.{spec.name}.{key} must be {expected}, not {str(value)[:80]!r}")
    if kind in (int, float) and not (math.isfinite(value) and abs(value) <= (INT_MAX if kind is int else 1e30)):
        raise CfbenchError(f"strategy_params.{spec.name}.{key} must be a finite number of sensible size, not {value!r}")
    why = spec.allowed[key].violation(value) if key in spec.allowed else None
    if why:
        raise CfbenchError(f"strategy_params.{spec.name}.{key} {why}, not {value!r}")
    return value


def check_params(combo: str, overrides: dict[str, dict]) -> None:
    """Names, types and values of the parameters (`StrategySpec.allowed`), before anything of a
    run is written; nothing is imported or built."""
    resolve_params(combo, overrides)


def needs_text(combo: str) -> bool:
    """Whether any component of the strategy needs a model with a text tower."""
    return any(spec.needs_text for spec in parse_strategy(combo))


def head_init(combo: str, default: str) -> str:
    """The head initialisation a strategy (or combination) trains with."""
    forced = {spec.head_init for spec in parse_strategy(combo) if spec.head_init}
    if len(forced) > 1:
        raise CfbenchError(f"{combo}: components force different head initialisations {sorted(forced)}")
    return forced.pop() if forced else default


def train_head(combo: str, default: str) -> str:
    """The head a strategy (or combination) trains: FLYP's are text heads."""
    forced = {spec.head for spec in parse_strategy(combo) if spec.head}
    return forced.pop() if forced else default


def adapt_model(combo: str, params: dict[str, dict], encoder, context: Optional[BuildContext] = None) -> None:
    """Installs the combination's adapters (at most one component adapts: `replaces` "parameters")."""
    for spec in parse_strategy(combo):
        if spec.adapts:
            try:
                load(spec.adapts)(encoder, context or BuildContext(), **params.get(spec.name, {}))
            except (TypeError, ValueError) as err:
                raise CfbenchError(f"strategy {spec.name}: {err}") from None


def build_plugins(combo: str, params: dict[str, dict], context: Optional[BuildContext] = None) -> list:
    plugins = []
    for spec in parse_strategy(combo):
        try:
            plugins += spec.make(context or BuildContext(), **params.get(spec.name, {}))
        except (TypeError, ValueError) as err:
            raise CfbenchError(f"strategy {spec.name}: {err}") from None
    return plugins


__all__ = ["BuildContext", "STRATEGIES", "StrategySpec", "register_strategy", "load", "parse_strategy",
           "resolve_params", "check_params", "check_data_parallel", "needs_text", "head_init", "train_head",
           "adapt_model", "build_plugins", "read_captions"]
