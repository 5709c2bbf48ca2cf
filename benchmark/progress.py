"""Progress output: live tqdm bars on a terminal, one line per finished stage otherwise
(CI logs, nohup, cluster jobs), so captured output never fills with carriage returns. Under DDP
only rank 0 shows progress. (No torch import: listings and checks show bars too.)"""
from __future__ import annotations

import sys
import time
from typing import Any, Optional

from tqdm.auto import tqdm



def _rank() -> int:
    """This process's rank in its process group, 0 without one. torch.distributed is read only
    where something imported it (no group can exist before): a bar costs no torch import."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank()


def interactive() -> bool:
    return sys.stderr.isatty()


class StageLine:
    """The tqdm calls the suite uses, printing one summary line when the stage closes."""

    def __init__(self, total: Optional[int] = None, desc: str = "", unit: str = "it", disable: bool = False, **_: Any):
        self.total, self.desc, self.unit, self.disable = total, desc, unit, disable
        self.n, self.postfix, self.start = 0, "", time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        if self.disable:
            return
        self.disable = True  # print once
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n} {self.unit}{'s' if self.n != 1 else ''} in "
              f"{time.monotonic() - self.start:.1f} s{extra}", file=sys.stderr, flush=True)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> "StageLine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(iterable=None, **kwargs):
    """tqdm(iterable, **kwargs) on a terminal, else a StageLine with the same calls."""
    if _rank() != 0:
        kwargs["disable"] = True
    if interactive():
        return tqdm(iterable, file=sys.stderr, **kwargs)
    kwargs.setdefault("total", len(iterable) if iterable is not None else None)
    line = StageLine(**kwargs)
    line.iterable = iterable
    return line
