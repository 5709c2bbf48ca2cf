"""`cfbench perf --projection PROTOCOL`: a protocol's wall time on this device, projected from the
tasks' published split sizes and the rates `rates.py` measures, for cfbench and for the official
code's path; beside it the protocol's peak memory (memory.py) and a floor under its GPU hours, its
counted FLOPs at datasheet peaks (flops.py). This module holds the arithmetic, the report and the
command's flow; rates.py and official.py measure the rates.

Per strategy (each is a run of its own): one evaluation round of the pretrained model, then per
task its LP-init head (where the strategy's head is LP-initialised), its training steps and the
round after it. A round extracts, for every evaluated dataset, the test features and -- for the
linear probe -- the probe's train (and validation) features, and fits one probe per dataset.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import strategies
import tasks
from tasks.base import holdout_size, published_counts

from ...config import RunConfig, load_config
from ...config.plan import RunPlan, check_text_needs, make_plan
from ...errors import CfbenchError
from ...models import OFFLINE_MODELS, default_image_size
from . import official
from .flops import DATASHEET_TFLOPS, floor_hours, flop_rates, probe_classes
from .memory import measure_memory
from .rates import PROBE_FITS, Rates, describe_device, measure_rates, random_encoder, say

# fits an LP-init head costs beyond the round before its task: it reuses that round's features and
# lr search (runner._lp_init_head), so only the refit on the train split runs -- none where the round's
# probe was fitted on train alone (a source val split); the official code extracts and sweeps again
LP_INIT_FITS = 1
HOURS = 3600.0
# strategies whose plugins read a dataset's images (ZSCL's reference set, LwF's and iCaRL's current or
# stored task images): random data cannot stand in for them here
READS_DATASETS = ("zscl", "lwf-clip", "lwf-vr", "icarl")


@dataclass(frozen=True)
class Sizes:
    """One dataset's split sizes under a config, from its published counts (caps assume balanced
    classes: at most cap x classes)."""

    train: int          # the split a task trains on
    probe_train: int
    probe_val: int
    test: int
    refit: int          # what cfbench's official probe refits on
    official_full: int  # the official code's whole train split (its probe refits there)


def _capped(n: int, cap: Optional[int], classes: int) -> int:
    return n if cap is None else min(n, cap * classes)


def dataset_sizes(name: str, cfg: RunConfig) -> Sizes:
    counts, classes = published_counts(tasks.get_task(name)), tasks.get_task(name).num_classes
    source_val = "val" in counts
    val = counts["val"] if source_val else holdout_size(counts["train"])
    train = counts["train"] if source_val else counts["train"] - val
    trainval = counts["train"] + (val if source_val else 0)
    probe_cap = cfg.eval.probe_max_per_class
    probe_train, probe_val = _capped(train, probe_cap, classes), _capped(val, probe_cap, classes)
    return Sizes(train=_capped(trainval if cfg.train.split == "trainval" else train, cfg.train.max_train_per_class,
                               classes),
                 probe_train=probe_train, probe_val=probe_val,
                 test=_capped(counts["test"], cfg.eval.test_max_per_class, classes),
                 refit=probe_train if source_val else probe_train + probe_val,
                 official_full=_capped(counts["train"], probe_cap, classes))


@dataclass
class Cost:
    """Seconds of one piece of work, cfbench's and the official path's (None: not emulated)."""

    train: float = 0.0
    eval: float = 0.0
    official: Optional[float] = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        official = None if self.official is None or other.official is None else self.official + other.official
        return Cost(self.train + other.train, self.eval + other.eval, official)


def round_cost(names: tuple[str, ...], sizes: dict[str, Sizes], cfg: RunConfig, rates: Rates) -> Cost:
    """One evaluation round over `names`. The official evaluation (evaluate.py, eval_functions.py,
    heads.py:146-182) runs its test loader twice (zero-shot, then linear probe) and extracts the
    probe's train, validation and whole train splits apart; without the official probe (ZSCL's
    protocol) the official evaluation is one zero-shot pass over test."""
    cost = Cost()
    for name in names:
        s, iters = sizes[name], cfg.eval.probe_iterations
        if cfg.eval.probe == "official":
            images = s.test + s.probe_train + s.probe_val
            probe = iters * rates.probe[name] * ((PROBE_FITS - 1) * s.probe_train + s.refit)
            official_images = s.probe_train + s.probe_val + s.official_full + 2 * s.test
            official = iters * rates.official_probe[name] * ((PROBE_FITS - 1) * s.probe_train + s.official_full)
        else:
            images, probe = s.test + s.probe_train, rates.probe[name] * s.probe_train
            official_images, official = s.test, 0.0
        cost += Cost(eval=images / rates.extract + probe, official=official_images / rates.official_extract + official)
    return cost


def lp_init_cost(name: str, s: Sizes, cfg: RunConfig, rates: Rates) -> Cost:
    """The task's LP-init head: LP_INIT_FITS fits on its probe features (none with the official probe
    where the round refitted on train alone). The official code (heads.py:146-182 for `<dataset>Val`)
    extracts train, hold-out and train again and runs the whole lr sweep on them."""
    if cfg.eval.probe != "official":
        return Cost(eval=LP_INIT_FITS * rates.probe[name] * s.probe_train)
    iters = cfg.eval.probe_iterations
    fits = 0 if s.refit == s.probe_train else LP_INIT_FITS
    official = ((2 * s.probe_train + s.probe_val) / rates.official_extract
                + iters * rates.official_probe[name] * PROBE_FITS * s.probe_train)
    return Cost(eval=fits * iters * rates.probe[name] * s.probe_train, official=official)


def train_cost(name: str, s: Sizes, strategy: str, cfg: RunConfig, rates: Rates) -> tuple[int, int, Cost]:
    """(images per pass, steps, cost) of training one task: epochs x ceil(images / batch) steps
    (the last batch kept), or train.iterations steps of a full batch."""
    batch = cfg.train.batch_size
    if cfg.train.iterations:
        steps, images = cfg.train.iterations, cfg.train.iterations * batch
    else:
        epochs = cfg.train.epochs_for(name)
        steps, images = epochs * math.ceil(s.train / batch), epochs * s.train
    official_rate = rates.official_train.get(strategy)
    official = None if official_rate is None else images / official_rate
    return s.train, steps, Cost(train=images / rates.train[strategy], official=official)


def lp_initialised(strategy: str, cfg: RunConfig) -> bool:
    return (strategies.train_head(strategy, cfg.train.head) == "linear"
            and strategies.head_init(strategy, cfg.train.head_init) == "lp")


@dataclass
class Row:
    task: str
    images: int
    steps: int
    cost: Cost

    def to_dict(self) -> dict:
        c = self.cost
        total = c.train + c.eval
        return {"task": self.task, "images": self.images, "steps": self.steps, "train_h": c.train / HOURS,
                "eval_h": c.eval / HOURS, "official_h": None if c.official is None else c.official / HOURS,
                "ratio": None if c.official is None or total <= 0 else c.official / total}


@dataclass
class Projection:
    strategy: str
    rows: list[Row] = field(default_factory=list)

    @property
    def total(self) -> Row:
        cost = Cost()
        for row in self.rows:
            cost += row.cost
        return Row("total", sum(r.images for r in self.rows), sum(r.steps for r in self.rows), cost)


def project(cfg: RunConfig, plan: RunPlan, strategy: str, rates: Rates) -> Projection:
    """The strategy's run over the plan: the pretrained round, then per task LP-init, training and
    the round after it."""
    sizes = {name: dataset_sizes(name, cfg) for name in plan.evaluated}
    out = Projection(strategy, [Row("pretrained", 0, 0, round_cost(plan.evaluated, sizes, cfg, rates))])
    for name in plan.trained:
        images, steps, cost = train_cost(name, sizes[name], strategy, cfg, rates)
        if lp_initialised(strategy, cfg):
            cost += lp_init_cost(name, sizes[name], cfg, rates)
        out.rows.append(Row(name, images, steps, cost + round_cost(plan.evaluated, sizes, cfg, rates)))
    return out


def invocation_total(projections: list[Projection]) -> Row:
    """All strategies as one `cfbench run` invocation: the pretrained round is evaluated once."""
    cost = Cost()
    for p in projections:
        cost += p.total.cost
    for p in projections[1:]:
        shared = p.rows[0].cost
        cost += Cost(-shared.train, -shared.eval, None if shared.official is None else -shared.official)
    return Row("all strategies", sum(p.total.images for p in projections), sum(p.total.steps for p in projections),
               cost)


def _h(value: Optional[float], width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width},.2f}"


def table(projection: Projection) -> list[str]:
    lines = [f"## {projection.strategy}",
             f"{'task':<14} {'images':>10} {'steps':>8} {'train h':>10} {'eval h':>10} {'official h':>11} {'ratio':>6}"]
    for row in [*projection.rows, projection.total]:
        d = row.to_dict()
        images = f"{d['images']:>10,}" if row.task != "pretrained" else f"{'-':>10}"
        steps = f"{d['steps']:>8,}" if row.task != "pretrained" else f"{'-':>8}"
        lines.append(f"{d['task']:<14} {images} {steps} {_h(d['train_h'], 10)} {_h(d['eval_h'], 10)} "
                     f"{_h(d['official_h'], 11)} {_h(d['ratio'], 6)}")
    return lines


def report(header: dict, rates: Rates, projections: list[Projection], notes: list[str]) -> dict:
    """Everything the text and the JSON output show."""
    return {"header": header, "rates": dataclasses.asdict(rates),
            "strategies": {p.strategy: {"rows": [r.to_dict() for r in p.rows], "total": p.total.to_dict()}
                           for p in projections},
            "invocation_total": invocation_total(projections).to_dict(), "notes": notes}


def text(result: dict, projections: list[Projection]) -> str:
    h = result["header"]
    scaled = (f"CPU numbers measured at --samples {h['samples']} images / features and scaled linearly by count"
              if h["scaled"] else "measured at real batch sizes and real probe sizes where they fit")
    lines = [f"# cfbench perf --projection {h['protocol']}: {h['device']}; model {h['model']} (random weights) at "
             f"{h['image_size']} px, {h['precision']}, batch {h['batch_size']}, {h['cache_format']} cache; strategies "
             f"{', '.join(h['strategies'])}; {scaled}"]
    for p in projections:
        lines += table(p)
    total = result["invocation_total"]
    lines.append(f"all strategies in one invocation (pretrained round once): cfbench "
                 f"{total['train_h'] + total['eval_h']:.2f} h, official "
                 f"{'-' if total['official_h'] is None else format(total['official_h'], '.2f')} h, ratio "
                 f"{'-' if total['ratio'] is None else format(total['ratio'], '.2f')}")
    r = result["rates"]
    lines.append("rates (img/s): cfbench train " + ", ".join(f"{k} {v:.1f}" for k, v in r["train"].items())
                 + "; official train " + ", ".join(f"{k} {'-' if v is None else format(v, '.1f')}"
                                                   for k, v in r["official_train"].items())
                 + f"; extraction cfbench {r['extract']:.1f}, official {r['official_extract']:.1f}")
    lines += memory_lines(result["memory"], h["scaled"])
    lines += floor_lines(result["compute_floor"])
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def memory_lines(memory: dict, scaled: bool) -> list[str]:
    """The peak tensor memory, and how it was measured."""
    how = ("counted storages on this CPU" if scaled else "the GPU allocator's peak") + ", extended linearly from " \
        f"batches {memory['train_measured_at'][0]} and {memory['train_measured_at'][1]}"
    steps = ", ".join(f"{combo} {gib:.2f} GiB" for combo, gib in memory["train_gib"].items())
    lines = [f"peak memory of a training step at batch {memory['train_batch']}: {steps} (tensors: {how}; a GPU adds "
             "its CUDA context, library workspaces and allocator slack)"]
    probe = memory.get("probe")
    if probe:
        lines.append(f"peak memory of the official probe's full-batch fit on {probe['dataset']} ({probe['features']:,} "
                     f"x {probe['width']} features, {probe['classes']:,} classes): {probe['gib']:.2f} GiB, plus up to "
                     f"{memory['resident_gib']:.2f} GiB the training leaves on the device (weights, gradients, "
                     f"optimizer state, references; measured at {probe['measured_at'][0]:,} and "
                     f"{probe['measured_at'][1]:,} features, extended linearly)")
    return lines


def compute_floor(cfg: RunConfig, plan: RunPlan, encoder, combos: list[str]) -> dict:
    """Each strategy's counted FLOPs over the plan (flops.py) and their hours at GPUs' datasheet peaks."""
    say("counting the FLOPs of the training steps, the extraction and the probes ...")
    rates = flop_rates(cfg, encoder, combos, tasks.get_task(plan.trained[0]).num_classes, probe_classes(plan.evaluated))
    precision = "fp32" if cfg.train.precision == "fp32" else "bf16"
    flops = {combo: project(cfg, plan, combo, rates).total.cost for combo in combos}
    return {"precision": precision, "datasheet_tflops": {gpu: peaks[precision] for gpu, peaks in DATASHEET_TFLOPS.items()},
            "flops": {combo: c.train + c.eval for combo, c in flops.items()},
            "train_flops": {combo: c.train for combo, c in flops.items()},
            "hours": {combo: floor_hours(c.train + c.eval, precision) for combo, c in flops.items()}}


def floor_lines(floor: dict) -> list[str]:
    peaks = floor["datasheet_tflops"]
    per_strategy = "; ".join(
        f"{combo} {floor['flops'][combo]:.2e} FLOP: " + ", ".join(f"{h:,.1f} h on an {gpu} ({peaks[gpu]:g})"
                                                                  for gpu, h in floor["hours"][combo].items())
        for combo in floor["flops"])
    return [f"compute floor at a GPU's datasheet peak ({floor['precision']} TFLOP/s in brackets): {per_strategy} -- "
            "counted matrix products and convolutions only, so a real run takes longer (memory traffic, kernel "
            "launches, data loading, text passes); a floor, not a projection"]


def _measurable(cfg: RunConfig, chosen: bool) -> tuple[list[str], list[str]]:
    """(strategies to project, notes on those left out); a chosen one that cannot be measured is an error."""
    has_text, measurable, notes = cfg.model.name not in OFFLINE_MODELS, [], []
    for combo in cfg.strategies:
        reading = [s.name for s in strategies.parse_strategy(combo) if s.name in READS_DATASETS]
        if reading:
            if chosen:
                raise CfbenchError(f"perf --projection: strategy {reading[0]} reads its reference images from a "
                                   "dataset, which a projection on random images cannot stand in for; choose others")
            notes.append(f"not projected: {combo} (its plugin reads a dataset's images)")
            continue
        check_text_needs(cfg, combo, has_text)
        measurable.append(combo)
    if not measurable:
        raise CfbenchError(f"perf --projection {cfg.protocol}: none of its strategies can be measured on random images")
    return measurable, notes


def _notes(cfg: RunConfig, header: dict) -> list[str]:
    scaled = ("on this CPU every rate was measured at --samples {samples} images (training batch {train_batch}, "
              "extraction batch {eval_batch}) and at most {samples} probe features per dataset, and the times are "
              "scaled linearly by count (full-batch probe steps are linear in N); fixed per-step costs are scaled "
              "too, so these hours are high".format(**header)) if header["scaled"] else (
        "training at the protocol's batch, probes at each dataset's real feature count where it fits in memory")
    if cfg.eval.probe == "official":
        probe = (f"probes: {PROBE_FITS} fits per dataset and round (5 lrs + refit) of {cfg.eval.probe_iterations} "
                 f"full-batch steps; an LP-init head costs {LP_INIT_FITS} fit (it reuses the round before it; none "
                 "where that round fitted on train alone), the official code's extracts and sweeps again")
    else:
        probe = ("probe: one sklearn fit per dataset and round, timed on random features; the official evaluation "
                 "is one zero-shot pass over test")
    return [scaled, probe,
            f"official path: {official.PHOTO_SIZE[0]}x{official.PHOTO_SIZE[1]} JPEG photos decoded by PIL in "
            f"{header['workers']} DataLoader workers with per-image transforms, fp32, not fused AdamW; LDIFS runs the "
            "reference and a second trained forward every step (the official get_features); datasets stored as "
            "arrays (MNIST, CIFAR, SVHN) decode no JPEG in the official code, so their official hours are high",
            "not projected: zero-shot classifiers' text passes, checkpoints, cfbench's first-use image cache, "
            "once-per-task passes (LDIFS's reference copy, EWC's Fisher)"]


def cache_format(cfg: RunConfig, sizes: dict[str, Sizes]) -> str:
    """The cache the run would read at the published sizes: cache_format as set, or for auto raw
    while every split fits cache_budget_gb as uint8 squares (config.plan.choose_cache_format)."""
    if cfg.cache_format != "auto":
        return cfg.cache_format
    side = cfg.model.image_size or default_image_size(cfg.model.name)
    images = sum(s.train + s.probe_train + s.probe_val + s.test for s in sizes.values())
    return "raw" if images * 3 * side ** 2 / 1e9 <= cfg.cache_budget_gb else "compact"


def run_projection(protocol: str, chosen: Optional[list[str]], samples: int, device: str,
                   model: Optional[dict] = None) -> tuple[dict, str]:
    """Measure, project and report: (the JSON-able result, the text table). `model`: settings laid
    over the protocol's model (`make gpu-check --tiny`: a tiny CLIP; the command line has no such flag)."""
    cfg = load_config(None, {"protocol": protocol, **({"strategies": chosen} if chosen else {}),
                             **({"model": model} if model else {})})
    plan = make_plan(cfg)
    combos, skipped = _measurable(cfg, bool(chosen))
    sizes = {name: dataset_sizes(name, cfg) for name in plan.evaluated}
    form = cache_format(cfg, sizes)
    probe_counts = {n: s.probe_train for n, s in sizes.items()}
    encoder = random_encoder(cfg)
    rates = measure_rates(cfg, plan, encoder, combos, samples, device, probe_counts, form)
    say("peak memory of the training steps and the largest probe ...")
    memory = measure_memory(cfg, encoder, combos, tasks.get_task(plan.trained[0]).num_classes, samples, device,
                            probe_counts)
    projections = [project(cfg, plan, combo, rates) for combo in combos]
    scaled = device != "cuda"
    header = {"protocol": protocol, "device": describe_device(device), "model": cfg.model.name,
              "image_size": cfg.model.image_size or default_image_size(cfg.model.name),
              "precision": "bf16" if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and not scaled)
              else "fp32", "batch_size": cfg.train.batch_size, "strategies": combos, "samples": samples,
              "scaled": scaled, "train_batch": min(cfg.train.batch_size, samples) if scaled else cfg.train.batch_size,
              "eval_batch": min(cfg.eval.batch_size, samples) if scaled else cfg.eval.batch_size,
              "workers": official.workers(), "cache_format": form}
    unofficial = [combo for combo, rate in rates.official_train.items() if rate is None]
    if unofficial:
        skipped.append(f"official training not emulated for {', '.join(unofficial)} (emulated: "
                       f"{', '.join(official.OFFICIAL_STEPS)} with linear heads): no official hours for them")
    result = report(header, rates, projections, _notes(cfg, header) + skipped)
    result["memory"] = memory
    result["compute_floor"] = compute_floor(cfg, plan, encoder, combos)
    return result, text(result, projections)
