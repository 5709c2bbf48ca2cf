"""Dataset registry: loaders, split conventions, class names, templates, named sequences.

Importing it costs no torch: the splits as tensors come from `tasks.loading.load_split`."""
from .base import LoadedTask, Task, TensorSplit
from .registry import (
    TASKS, DataUnavailable, clear_memory, download_task, get_task, register_image_folders, loaded_task, register_task, resolve_data_root, split_count,
    task_classes, task_status
)
from .sequences import SEQUENCES, Sequence, parse_task_list, resolve_sequence

__all__ = ["LoadedTask", "Task", "TensorSplit", "TASKS", "DataUnavailable", "clear_memory", "download_task", "get_task", "register_image_folders",
           "loaded_task", "register_task", "resolve_data_root", "split_count", "task_classes", "task_status",
           "SEQUENCES", "Sequence", "parse_task_list", "resolve_sequence"]
