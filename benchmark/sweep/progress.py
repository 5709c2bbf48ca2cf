"""A sweep's progress on stderr: on a terminal one live line (counts per state and each running
run's finished tasks, redrawn in place); otherwise (CI, nohup, a cluster job's log) one line per
change -- a run changing state or finishing a task -- so captured logs never hold carriage returns."""
from __future__ import annotations

import shutil
import sys
import time
from typing import Optional, TextIO

from ..progress import interactive

STATES = ("queued", "running", "done", "failed")


class SweepProgress:
    def __init__(self, totals: dict[str, int], stream: Optional[TextIO] = None, live: Optional[bool] = None):
        self.totals = dict(totals)                       # run -> trained tasks
        self.states = {name: "queued" for name in totals}
        self.completed = {name: 0 for name in totals}
        self.stream = stream or sys.stderr
        self.live = interactive() if live is None else live
        self.start = time.monotonic()
        self._drawn = False

    def counts(self) -> str:
        return ", ".join(f"{sum(s == state for s in self.states.values())} {state}" for state in STATES)

    def state(self, name: str, state: str, detail: str = "") -> None:
        if self.states.get(name) == state and not detail:
            return
        self.states[name] = state
        if self.live:
            self._draw()
        else:
            self._line(f"{name}: {state}{' (' + detail + ')' if detail else ''} [{self.counts()}]")

    def tasks(self, name: str, completed: int, last: str = "") -> None:
        if completed == self.completed.get(name):
            return
        self.completed[name] = completed
        if self.live:
            self._draw()
        else:
            self._line(f"{name}: {completed}/{self.totals[name]} tasks{' (' + last + ')' if last else ''}")

    def note(self, text: str) -> None:
        """A line that stays (a retry, an error), above the live line."""
        if self.live and self._drawn:
            self.stream.write("\r\x1b[K")
        self._line(text)
        if self.live:
            self._draw()

    def refresh(self) -> None:
        """Redraw the live line (its clock); nothing when not on a terminal."""
        if self.live:
            self._draw()

    def close(self) -> None:
        if self.live and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def _line(self, text: str) -> None:
        print(f"[sweep {time.monotonic() - self.start:6.0f} s] {text}", file=self.stream, flush=True)

    def _draw(self) -> None:
        running = [f"{n} {self.completed[n]}/{self.totals[n]}" for n, s in self.states.items() if s == "running"]
        text = f"sweep {time.monotonic() - self.start:.0f} s: {self.counts()}"
        if running:
            text += " | " + ", ".join(running)
        width = shutil.get_terminal_size((120, 20)).columns - 1
        self.stream.write("\r\x1b[K" + (text if len(text) <= width else text[:width - 1] + "…"))
        self.stream.flush()
        self._drawn = True
