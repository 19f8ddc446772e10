"""Progress on stderr: one line redrawn in place on a terminal, plain lines (for logs and CI) otherwise."""

import re
import sys
from typing import Any, TextIO

_STEP = re.compile(r"step (\d+)/(\d+)")
_BAR_WIDTH = 24
_PLAIN_EVERY = 5  # steps between plain lines: a log file gets the gist, not every step


def latest_step(status: dict[str, Any]) -> tuple[int, int] | None:
    """The last `step N/M` in the status's logs."""
    for entry in reversed(status.get("logs") or []):
        found = _STEP.search(str(entry.get("message", ""))) if isinstance(entry, dict) else None
        if found:
            return int(found[1]), int(found[2])
    return None


class Progress:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last: str | None = None
        self._last_step = 0
        self._drawn = False

    def _show(self, text: str) -> None:
        if text == self._last:
            return
        self._last = text
        if self.tty:
            self.stream.write(f"\r\x1b[K{text}")
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        """A message of its own (never overwritten)."""
        self.end()
        self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False
        self._last = None

    def status(self, status: dict[str, Any]) -> None:
        state = status.get("status")
        if state == "IN_QUEUE":
            position = status.get("queue_position")
            self._show(f"queued: position {position}" if self.tty else f"queued, position {position}")
            return
        if state != "IN_PROGRESS":
            return
        step = latest_step(status)
        if step is None:
            self._show("running")
            return
        done, total = step
        if self.tty:
            filled = _BAR_WIDTH * done // max(total, 1)
            self._show(f"step {done}/{total} [{'#' * filled}{' ' * (_BAR_WIDTH - filled)}]")
        elif done == total or done < self._last_step or done - self._last_step >= _PLAIN_EVERY:
            self._show(f"step {done}/{total}")
            self._last_step = done

    def downloading(self, index: int, count: int) -> None:
        self._show(f"downloading {index}/{count}")
