"""The tables cfbench reads without importing their libraries (so that listings and checks answer
at once) are the libraries' own: the strategy registry's lazy references and allowed values,
open_clip's model configs and pretrained tags, ImageNet's names and WordNet ids, split sizes."""
import inspect
from pathlib import Path

import open_clip
import pytest
from timm.data import ImageNetInfo

import strategies
from benchmark.errors import CfbenchError
from benchmark.models.catalog import open_clip_configs, open_clip_pretrained, pretrained_tags
from strategies import STRATEGIES, load, resolve_params
from tasks import loaded_task
from tasks.metadata import imagenet_classnames, imagenet_wnids
from tasks.registry import split_indices, split_sizes

# the plugin class whose constructor checks a builder strategy's values
CONSTRUCTORS = {"zscl": "zscl:ZSCLPlugin", "lwf-clip": "zscl:ZSCLPlugin", "lwf-vr": "zscl:ZSCLPlugin",
                "icarl": "icarl:ICaRLPlugin"}
PROBES = (-1, -1e-9, 0, 1e-9, 0.5, 0.999, 1, 2, 10 ** 7, True, "", "x", None)


def test_every_lazy_reference_names_a_callable():
    for spec in STRATEGIES.values():
        for reference in (spec.build, spec.plugin, CONSTRUCTORS.get(spec.name)):
            if isinstance(reference, str):
                assert callable(load(reference)), (spec.name, reference)


def test_the_registry_copies_of_choices_are_the_modules_own():
    assert strategies.LDIFS_CACHE_DTYPES == load("slice_store:DTYPES")
    assert strategies.ICARL_SELECTIONS == load("icarl:SELECTIONS")


@pytest.mark.parametrize("name", [n for n in STRATEGIES if STRATEGIES[n].plugin or n in CONSTRUCTORS])
def test_no_value_the_registry_passes_is_refused_by_the_plugin(name):
    """`run --check` checks values by `StrategySpec.allowed` alone (it builds no plugin): every
    value it passes must pass the plugin's own constructor too, or a checked run fails later."""
    spec = STRATEGIES[name]
    plugin = load(spec.plugin or CONSTRUCTORS[name])
    # the values a builder reads itself (zscl's reference_texts: a file) are not the plugin's
    builder = set(inspect.signature(load(spec.build)).parameters) if spec.build else set()
    takes = set(inspect.signature(plugin).parameters) - builder
    checked = 0
    for key, default in spec.defaults.items():
        if key not in takes:
            continue
        for value in (*PROBES, *(spec.allowed[key].choices if key in spec.allowed else ()), default):
            try:
                params = resolve_params(name, {name: {key: value}})[name]
            except CfbenchError:
                continue
            plugin(**{k: v for k, v in params.items() if k in takes})  # raises if the registry let it through
            checked += 1
    assert checked >= len([k for k in spec.defaults if k in takes])


def test_open_clip_tables_read_from_source_equal_open_clips_own():
    assert list(open_clip_configs()) == open_clip.list_models()
    models = {m for m, _ in open_clip.list_pretrained()}
    assert set(open_clip_pretrained()) == models
    for model in models:
        assert pretrained_tags(model) == open_clip.list_pretrained_tags_by_model(model)
        for tag in pretrained_tags(model):
            ours, theirs = open_clip_pretrained()[model][tag], open_clip.get_pretrained_cfg(model, tag)
            assert (ours.get("hf_hub"), bool(ours.get("quick_gelu"))) == (theirs.get("hf_hub"),
                                                                           bool(theirs.get("quick_gelu")))


def test_imagenet_tables_read_from_files_equal_the_libraries():
    assert imagenet_classnames() == tuple(open_clip.IMAGENET_CLASSNAMES)
    assert imagenet_wnids() == tuple(ImageNetInfo("imagenet-1k").label_names())


@pytest.mark.parametrize("task", ["digits", "faces", "mnist5k"])
def test_split_sizes_counted_without_the_hold_out_equal_the_drawn_splits(task):
    found = loaded_task(task)
    assert split_sizes(found) == {s: len(split_indices(found, s)[1]) for s in ("train", "val", "test")}


README = Path(__file__).resolve().parents[1] / "README.md"
SYMBOLS = {"alpha": "α", "ewc_lambda": "λ", "temperature": "T", "beta": "β"}  # the README's short names


def _readme_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_the_readme_strategy_table_is_the_registry():
    """One row per registered strategy, in the registry's order, and every parameter with its
    default in the row (by name or the README's symbol); a strategy without parameters shows —."""
    text = README.read_text()
    table = text[text.index("## Strategies"):text.index("## Architecture")]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| `")]
    assert [row[0].strip("| `") for row in rows] == list(STRATEGIES)
    for row in rows:
        name, defaults = row[0].strip("| `"), row[-1].rstrip(" |")
        params = STRATEGIES[name].defaults
        if not params:
            assert defaults == "—", name
        for param, value in params.items():
            assert any(f"{key}={_readme_value(value)}" in defaults for key in (param, SYMBOLS.get(param, param))), \
                (name, param, value, defaults)


def test_the_readme_links_only_to_files_in_the_repository():
    """Every relative link of README.md and docs/ names a file here; no document outside the
    repository (the SPEC the code once pointed to) is cited."""
    import re

    root = README.parent
    linked = []
    for page in [README, *sorted((root / "docs").glob("*.md"))]:
        text = page.read_text()
        assert "SPEC" not in text, page.name
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (page.parent / target).exists(), (page.name, target)
            linked.append(target)
    assert {"docs/demo-results.md", "docs/protocols.md", "configs/sweep.yaml"} <= set(linked)
