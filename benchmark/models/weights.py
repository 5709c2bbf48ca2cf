"""Where an open_clip model's pretrained weights are, found without a network round-trip.

open_clip fetches a tag's weights from the Hugging Face hub (or the tag's URL) and, with no
internet, retries for about a minute before it fails. cfbench looks in the same caches first:
a run loads a cached file by its path (no hub call at all), and `--check` names weights that
are not cached, with the command that fetches them. Imports no torch (huggingface_hub only).
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Optional

from ..errors import CfbenchError
from .catalog import open_clip_configs, open_clip_pretrained, pretrained_tags

HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's order
URL_CACHE = Path("~/.cache/clip")  # open_clip's download_pretrained_from_url default


def weight_sources(name: str, tag: str) -> tuple[Optional[tuple[str, tuple[str, ...]]], Optional[str]]:
    """((hub repo, file names) or None, URL or None) of a tag, as open_clip's table gives them."""
    cfg = open_clip_pretrained().get(name, {}).get(tag) or {}
    hub = None
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # as open_clip's download_pretrained splits it
        if filename:  # 'org/model/file.bin': that file (or its .safetensors twin) in org/model
            stem = filename.rsplit(".", 1)[0]
            names = (f"{stem}.safetensors", filename) if filename.endswith((".bin", ".pth")) else (filename,)
        else:  # 'org/model/': open_clip's default file names
            names = HF_WEIGHT_FILES
        hub = (repo, names)
    return hub, cfg.get("url")


def cached_weights(name: str, tag: str) -> Optional[str]:
    """The path of a cached copy of `name`'s `tag` weights (hub cache, then open_clip's URL
    cache), or None. Reads the file system only."""
    hub, url = weight_sources(name, tag)
    if hub is not None:
        from huggingface_hub import try_to_load_from_cache

        repo, names = hub
        for filename in names:
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if url:
        path = URL_CACHE.expanduser() / os.path.basename(url)
        if path.is_file():
            return str(path)
    return None


def download_command(name: str, tag: str) -> str:
    return f"cfbench data download --model {shlex.quote(name)} --pretrained {shlex.quote(tag)}"


def missing_weights_message(name: str, tag: str) -> str:
    """One line: the weights are not cached, how to fetch them, and the offline alternative."""
    hub, url = weight_sources(name, tag)
    where = f"hf-hub {hub[0]}" if hub else url
    gelu = " (OpenAI's weights: also model.quick_gelu=true)" if tag == "openai" else ""
    return (f"model {name} {tag!r}: weights are not cached on this machine (a run would fetch them from {where}); "
            f"fetch them once with `{download_command(name, tag)}` (needs internet), or give a local file: "
            f"--pretrained FILE{gelu}")


def require_cached(name: str, tag: str) -> str:
    """The cached weights' path, or the one-line error (before any network is tried)."""
    path = cached_weights(name, tag)
    if path is None:
        raise CfbenchError(missing_weights_message(name, tag))
    return path


def download_weights(name: str, tag: str) -> str:
    """Fetch `name`'s `tag` weights into the cache a run reads (the hub cache, else open_clip's
    URL cache) with open_clip's own downloader; returns the file's path. Already cached: no network."""
    check_model_tag(name, tag)
    found = cached_weights(name, tag)
    if found is not None:
        return found
    import open_clip  # the download itself: open_clip's hub / URL logic

    try:
        path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(name, tag))
    except Exception as err:  # hub, HTTP and file-system errors of every kind
        raise CfbenchError(f"model {name} {tag!r}: download failed ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); without internet give a local file: "
                           "--pretrained FILE") from None
    if not path or not os.path.isfile(path):
        raise CfbenchError(f"model {name} {tag!r}: open_clip's download gave no file")
    return path


def check_model_tag(name: str, tag: str) -> None:
    if name not in open_clip_pretrained() and name not in open_clip_configs():
        raise CfbenchError(f"unknown open_clip model {name!r}; see `cfbench list models`")
    tags = pretrained_tags(name)
    if tag not in tags:
        raise CfbenchError(f"model {name}: no pretrained tag {tag!r}; its tags are {tags or 'none'}")


ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet_Weights.IMAGENET1K_V1


def torch_hub_checkpoints() -> Path:
    """torch.hub's checkpoint folder, as torch.hub.get_dir() finds it ($TORCH_HOME/hub, else
    $XDG_CACHE_HOME/torch/hub, else ~/.cache/torch/hub), without importing torch."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub" / "checkpoints"


def require_alexnet() -> str:
    """MoE-Adapters' selector features: torchvision's cached AlexNet ImageNet weights, or one line."""
    path = torch_hub_checkpoints() / ALEXNET_FILE
    if not path.is_file():
        raise CfbenchError(f"moe-adapters: the selector's AlexNet ImageNet weights are not on this machine ({path}); "
                           "on one with internet run python -c \"import torchvision; torchvision.models.alexnet("
                           "weights='DEFAULT')\" (233 MB), or set strategy_params.moe-adapters.extractor: clip (the "
                           "frozen CLIP image embedding; not the paper's)")
    return str(path)
