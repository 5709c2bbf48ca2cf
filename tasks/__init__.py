"""Dataset registry: loaders, seeded splits, class names, named sequences."""
from .base import RawSplit, Task, TensorSplit
from .registry import TASKS, get_task, load_split, register_task, task_available
from .sequences import SEQUENCES, Sequence, parse_task_list, resolve_sequence

__all__ = ["RawSplit", "Task", "TensorSplit", "TASKS", "get_task", "load_split", "register_task",
           "task_available", "SEQUENCES", "Sequence", "parse_task_list", "resolve_sequence"]
