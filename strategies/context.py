"""What a strategy's builder may read about the run it joins."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class BuildContext:
    """The run's settings a builder needs (reference images, prompts, seeds); the runner fills it,
    tests give what their strategy reads."""

    image_size: int = 224
    seed: int = 0
    data_root: Optional[str] = None
    cache_dir: Optional[str] = None
    cache_format: str = "raw"
    tasks: tuple[str, ...] = ()                            # the trained tasks, in order
    train_split: str = "train"                             # the split the tasks train on (train.split)
    train_cap: Optional[int] = None                        # its per-class cap (train.max_train_per_class)
    template_of: Optional[Callable[[str], str]] = None     # task -> the prompt template the run uses
    templates_of: Optional[Callable[[str], list[str]]] = None  # task -> every template the run uses
    classes_of: Optional[Callable[[str], list[str]]] = None  # task -> the class names the run uses
    tokenizer: Any = None                                  # the model's (open_clip) tokenizer, if any
    train_head: str = "linear"                             # train.head as the strategy trains it
