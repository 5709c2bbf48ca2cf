"""Strategy registry. A strategy is a list of Avalanche plugins built from named parameters;
`a+b` composes strategies. To add one: copy a module here, register it below, copy its test."""
from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from benchmark.errors import CfbenchError
from benchmark.files import read_text
from tasks import get_task, load_split, task_classes

from .context import BuildContext
from .ewc import EWC
from .flyp import FLYPPlugin
from .flyp_ce import FLYPCEPlugin
from .icarl import SELECTIONS, ICaRLPlugin
from .l2sp import L2SPPlugin
from .label_smoothing import LabelSmoothingPlugin
from .ldifs import LDIFSPlugin, ldifs_distance
from .lwf import LwF
from .wise_ft import WiSEFTPlugin
from .zscl import ZSCLPlugin, virtual_vocab


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


@dataclass(frozen=True)
class StrategySpec:
    """build(context: BuildContext, **params) -> plugins (strategies/context.py says what a context holds)."""

    name: str
    description: str
    build: Callable[..., list]
    defaults: dict[str, Any] = field(default_factory=dict)
    needs_text: bool = False
    head_init: Optional[str] = None  # overrides train.head_init (LP-FT: always "lp")
    head: Optional[str] = None  # overrides train.head (FLYP trains both towers: always "text")
    # what of the training step the strategy replaces ("forward", "loss"): two components may not
    # replace the same; "output" readers (LwF distils mb_output) cannot follow a replaced forward
    replaces: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    notes: str = ""  # shown by `cfbench list strategies`
    # the plugin class the build makes: its constructor checks the values (given the parameters it
    # takes; the others are the builder's) before a run starts
    plugin: Optional[type] = None
    # parameters that size resources on this machine, not the method (left out of a run's deviations)
    machine: tuple[str, ...] = ()
    # {parameter: Allowed}: where the method makes sense (a negative weight would train to the end)
    allowed: dict[str, Allowed] = field(default_factory=dict)
    # why the strategy cannot train one run over several processes (None: it can, exactly)
    not_data_parallel: Optional[str] = None


def _plugin_spec(name: str, description: str, plugin: type, defaults: dict, **extra) -> StrategySpec:
    """A strategy that is one plugin built from its parameters alone."""
    return StrategySpec(name, description, lambda ctx, **kw: [plugin(**kw)], defaults, plugin=plugin, **extra)


STRATEGIES: dict[str, StrategySpec] = {}
log = logging.getLogger("cfbench")


def register_strategy(spec: StrategySpec) -> StrategySpec:
    STRATEGIES[spec.name] = spec
    return spec


register_strategy(StrategySpec("ft", "cross-entropy fine-tuning (head initialised as configured)", lambda ctx: []))
register_strategy(StrategySpec("lpft", "LP-FT: head fitted on frozen-encoder features (LP-init), then FT",
                               lambda ctx: [], head_init="lp"))
register_strategy(_plugin_spec("ldifs", "CE + alpha * feature-space distance to a frozen reference encoder",
                               LDIFSPlugin, {"alpha": 10.0, "reference": "previous", "normalize": "official", "cache": True,
                                "cache_budget_mb": 4096.0, "cache_dtype": "auto", "cache_disk_mb": 32768.0},
                               notes="with train.augment on, the reference runs on every augmented batch "
                                     "(the per-sample cache holds un-augmented inputs and is not used)",
                               machine=("cache", "cache_budget_mb", "cache_disk_mb"),
                               allowed={"alpha": NON_NEGATIVE, "reference": Allowed(choices=("previous", "pretrained")),
                                        "normalize": Allowed(choices=("official", "channel")),
                                        "cache_budget_mb": NON_NEGATIVE, "cache_disk_mb": NON_NEGATIVE}))
register_strategy(_plugin_spec("l2sp", "CE + alpha * squared l2 distance of encoder weights to a reference",
                               L2SPPlugin, {"alpha": 0.5, "reference": "previous"},
                               allowed={"alpha": NON_NEGATIVE, "reference": Allowed(choices=("previous", "pretrained"))}))
register_strategy(_plugin_spec("ewc", "Avalanche EWCPlugin (Fisher-weighted weight penalty)",
                               EWC, {"ewc_lambda": 100.0, "mode": "separate"},
                               allowed={"ewc_lambda": NON_NEGATIVE, "mode": Allowed(choices=("separate", "online"))}))
register_strategy(_plugin_spec("lwf", "Avalanche LwFPlugin (distil previous heads' outputs)",
                               LwF, {"alpha": 1.0, "temperature": 2.0}, reads=("output",),
                               allowed={"alpha": NON_NEGATIVE, "temperature": POSITIVE}))
register_strategy(_plugin_spec("wise-ft", "after each task interpolate weights: (1-beta) before + beta after",
                               WiSEFTPlugin, {"beta": 0.5}, allowed={"beta": FRACTION}))

register_strategy(_plugin_spec("ls", "cross-entropy with smoothed labels (the LDIFS code's --finetune-loss ls)",
                               LabelSmoothingPlugin, {"smoothing": 0.1}, replaces=("loss",),
                               notes="the official --ls-factor default is 0.0 (= ft); 0.1 is cfbench's, not the "
                                     "paper's: set the factor you compare",
                               allowed={"smoothing": Allowed(min=0, max=0.999)}))


def _prompts_for(ctx: BuildContext) -> Callable[[int], tuple[list[str], list[str]]]:
    """task index -> (class names, every template) of that task, as the run names them."""
    def prompts(t: int) -> tuple[list[str], list[str]]:
        name = ctx.tasks[t]
        classes = ctx.classes_of(name) if ctx.classes_of else task_classes(name, ctx.data_root)
        return list(classes), list(ctx.templates_of(name) if ctx.templates_of else get_task(name).templates)
    return prompts


register_strategy(StrategySpec("flyp", "FLYP: CLIP's contrastive loss between each image and a prompt of its class, "
                               "both towers trained", lambda ctx: [FLYPPlugin(_prompts_for(ctx))],
                               needs_text=True, head="text", replaces=("forward", "loss"),
                               not_data_parallel="its contrastive loss couples every image of the batch with every "
                                                 "prompt, which a rank's shard does not see",
                               notes="logit_scale is used as a number (the official .item()): it never trains; "
                                     "the text head (templates[0]) is only evaluated"))
register_strategy(StrategySpec("flyp-ce", "FLYP-CE: cross-entropy over one randomly drawn prompt per class, both "
                               "towers and logit_scale trained",
                               lambda ctx: [FLYPCEPlugin(_prompts_for(ctx))], needs_text=True, head="text",
                               not_data_parallel="it replaces the training forward, which DistributedDataParallel "
                                                 "must run",
                               replaces=("forward",)))


def _reference_images(ctx: BuildContext, task: str, split: str):
    """A split of a task as a reference image set (the cached, un-augmented images)."""

    return load_split(task, split, ctx.image_size, ctx.data_root, seed=ctx.seed, cache_dir=ctx.cache_dir,
                      cache_format=ctx.cache_format).x


def _class_prompts(ctx: BuildContext, task: str) -> list[str]:
    """One prompt per class: the first template over the class names the run uses (the runner's
    `template_of` / `classes_of`; without them the task's defaults)."""

    template = ctx.template_of(task) if ctx.template_of else get_task(task).templates[0]
    classes = ctx.classes_of(task) if ctx.classes_of else task_classes(task, ctx.data_root)
    return [template.format(c) for c in classes]


def _build_zscl(ctx: BuildContext, reference_task: str, reference_texts: Optional[str], **kw) -> list:
    """Reference images: the task's train split (not augmented); reference texts: a captions file
    (one per line, e.g. Conceptual Captions' validation captions as in the official code) or,
    without one, the reference task's class prompts (announced in the log)."""
    if reference_texts:
        texts = read_captions(reference_texts)
    else:
        texts = _class_prompts(ctx, reference_task)
        log.info("ZSCL: no reference_texts file given; the reference texts are %d class prompts of %s",
                 len(texts), reference_task)
    # the reference task's whole train split: ZSCL's ImageNet train folder (finetune.py:140-145 ->
    # datasets/imagenet.py:30-43), no validation hold-out taken out of it
    return [ZSCLPlugin(reference_images=_reference_images(ctx, reference_task, "trainval"), reference_texts=texts,
                       seed=ctx.seed, **kw)]


def _build_lwf_clip(ctx: BuildContext, random_texts: bool = False, **kw) -> list:
    """ZSCL's LwF baseline: the ZSCL loss with the previous task's model as teacher, on the current
    task's images as it trains on them (lwf.sh: its train loader; not augmented) and class prompts
    (templates[0] per class); LwF-VR: random token sequences instead of the prompts (ZSCL's
    --ref-sentences random), drawn anew for each task."""
    import torch


    generator = torch.Generator()

    def reference_for(t: int):
        name = ctx.tasks[t]
        if random_texts:
            generator.manual_seed(ctx.seed * 1000 + t)
            return _reference_images(ctx, name, ctx.train_split), virtual_vocab(ctx.tokenizer, generator)
        return _reference_images(ctx, name, ctx.train_split), _class_prompts(ctx, name)

    return [ZSCLPlugin(teacher="previous", reference_for=reference_for, l2=0.0, weight_ensemble=False,
                       seed=ctx.seed, **kw)]


CAPTIONS_BYTES = 256 * 1024 ** 2  # Conceptual Captions' 3.3 M training captions are ~190 MB


def read_captions(path: str) -> list[str]:
    """One caption per line; blank lines skipped."""
    lines = read_text(Path(path), "reference_texts file", limit=CAPTIONS_BYTES).splitlines()
    captions = [line.strip() for line in lines if line.strip()]
    if not captions:
        raise CfbenchError(f"zscl reference_texts {path}: no captions in it")
    return captions


register_strategy(StrategySpec("zscl", "distil the initial CLIP on a reference set, l2 to the previous weights, "
                               "weight ensembling",
                               _build_zscl, {"reference_task": "photo_patches", "reference_texts": None,
                                             "temperature": 2.0, "weight": 1.0, "text_loss": False, "l2": 0.0,
                                             "avg_freq": 100, "ref_batch_size": 64, "weight_ensemble": True,
                                             "feature_budget_mb": 2048.0},
                               needs_text=True, plugin=ZSCLPlugin, machine=("feature_budget_mb",),
                               notes="teacher features of the reference set are kept float32 within "
                                     "feature_budget_mb, else float16 (ImageNet's: 1.3 GB)",
                               allowed={"temperature": POSITIVE, "weight": NON_NEGATIVE, "l2": NON_NEGATIVE,
                                        "avg_freq": AT_LEAST_ONE, "ref_batch_size": AT_LEAST_ONE,
                                        "feature_budget_mb": NON_NEGATIVE}))
_LWF_CLIP_ALLOWED = {"temperature": POSITIVE, "weight": NON_NEGATIVE, "ref_batch_size": AT_LEAST_ONE}
register_strategy(StrategySpec("lwf-clip", "ZSCL's LwF baseline: distil the previous model on the current task's "
                               "images and class prompts (image and text side)",
                               _build_lwf_clip, {"temperature": 2.0, "weight": 1.0, "text_loss": True,
                                                 "ref_batch_size": 64}, needs_text=True, plugin=ZSCLPlugin,
                               allowed=_LWF_CLIP_ALLOWED))
register_strategy(StrategySpec("lwf-vr", "ZSCL's LwF-VR baseline: lwf-clip with random token sequences (1,000 of "
                               "10 tokens per task) as the reference texts",
                               lambda ctx, **kw: _build_lwf_clip(ctx, random_texts=True, **kw),
                               {"temperature": 2.0, "weight": 1.0, "text_loss": True, "ref_batch_size": 64},
                               needs_text=True, plugin=ZSCLPlugin, allowed=_LWF_CLIP_ALLOWED))

# ZSCL's iCaRL baseline (scripts/icarl.sh; strategies/icarl.py cites every value). Exemplars: positions in each
# task's `train.split` (its cached, un-augmented images); distillation texts: the current task's class prompts.
register_strategy(StrategySpec("icarl", "ZSCL's iCaRL baseline: a memory of the previous tasks' images (herding) on "
                               "which the pretrained CLIP is distilled against the current task's class prompts",
                               lambda ctx, **kw: [ICaRLPlugin(
                                   images_of=lambda t: _reference_images(ctx, ctx.tasks[t], ctx.train_split),
                                   prompts_of=lambda t: _class_prompts(ctx, ctx.tasks[t]), num_tasks=len(ctx.tasks),
                                   **kw)],
                               {"memory_size": 10000, "max_candidates": 30000, "selection": "official",
                                "temperature": 2.0, "weight": 1.0, "text_loss": True, "ref_batch_size": 64},
                               needs_text=True, plugin=ICaRLPlugin,
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
                                        "selection": Allowed(choices=SELECTIONS), "temperature": POSITIVE,
                                        "weight": NON_NEGATIVE, "ref_batch_size": AT_LEAST_ONE}))


def parse_strategy(combo: str) -> list[StrategySpec]:
    names = [n.strip().lower() for n in combo.split("+") if n.strip()]
    if not names:
        raise CfbenchError("empty strategy name")
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise CfbenchError(f"unknown strategy {unknown[0]!r}; known: {', '.join(STRATEGIES)} (combine with +)")
    specs = [STRATEGIES[n] for n in names]
    for part in ("forward", "loss"):
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
    """Types, names and -- for one-plugin strategies, by building the plugin -- values of the
    parameters, before anything of a run is written."""
    for name, params in resolve_params(combo, overrides).items():
        spec = STRATEGIES[name]
        if spec.plugin is not None:
            builders = set(inspect.signature(spec.build).parameters)  # e.g. zscl's reference_texts: a file path
            takes = set(inspect.signature(spec.plugin).parameters) - builders
            try:
                spec.plugin(**{k: v for k, v in params.items() if k in takes})
            except (TypeError, ValueError) as err:
                raise CfbenchError(f"strategy_params.{name}: {err}") from None


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


def build_plugins(combo: str, params: dict[str, dict], context: Optional[BuildContext] = None) -> list:
    plugins = []
    for spec in parse_strategy(combo):
        try:
            plugins += spec.build(context or BuildContext(), **params.get(spec.name, {}))
        except (TypeError, ValueError) as err:
            raise CfbenchError(f"strategy {spec.name}: {err}") from None
    return plugins


__all__ = ["BuildContext", "STRATEGIES", "StrategySpec", "register_strategy", "parse_strategy", "resolve_params",
           "check_params", "needs_text", "head_init", "train_head", "build_plugins", "LDIFSPlugin", "L2SPPlugin",
           "EWC", "LwF", "WiSEFTPlugin", "ZSCLPlugin", "ldifs_distance"]
