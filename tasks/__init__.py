"""Dataset registry: loaders, split conventions, class names, templates, named sequences."""
from .base import LoadedTask, Task, TensorSplit
from .registry import (
    TASKS, DataUnavailable, clear_memory, get_task, load_split, loaded_task, register_task, resolve_data_root,
    split_count, task_classes, task_status
)
from .sequences import SEQUENCES, Sequence, parse_task_list, resolve_sequence

__all__ = ["LoadedTask", "Task", "TensorSplit", "TASKS", "DataUnavailable", "clear_memory", "get_task", "load_split",
           "loaded_task", "register_task", "resolve_data_root", "split_count", "task_classes", "task_status",
           "SEQUENCES", "Sequence", "parse_task_list", "resolve_sequence"]
