"""Progress bars: tqdm's on a terminal; elsewhere (a log file, a pipe, a batch job) plain lines,
at most one per bar every `LOG_INTERVAL` seconds and one when it ends, with no carriage returns or
cursor movements for nested bars to scatter through the log.

Modules take their bar from here (`from .progress import tqdm`), so this is the one place to
change how progress is shown."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm as terminal_tqdm

LOG_INTERVAL = 30.0  # seconds between two lines of one bar when the output is not a terminal


def _is_terminal(stream) -> bool:
    return bool(getattr(stream, "isatty", None) and stream.isatty())


class tqdm(terminal_tqdm):  # noqa: N801 - a drop-in for tqdm.auto.tqdm
    """tqdm.auto.tqdm, or plain periodic lines when its output is not a terminal."""

    def __init__(self, *args, **kwargs):
        self._plain = not _is_terminal(kwargs.get("file") or sys.stderr)
        if self._plain:
            kwargs.setdefault("mininterval", LOG_INTERVAL)
            kwargs.setdefault("maxinterval", LOG_INTERVAL * 10)
            kwargs["position"], kwargs["dynamic_ncols"], kwargs["ncols"] = 0, False, 100
            kwargs["ascii"] = True
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """On a terminal, tqdm's own; elsewhere one plain line once the bar has moved (not the empty
        message tqdm uses to erase a bar, nor the bar's zero state)."""
        if not self._plain:
            return super().display(msg, pos)
        if msg == "" or self.n == 0 and msg is None:
            return True
        self._line(msg)
        return True

    def close(self) -> None:
        """Elsewhere than a terminal: a last line for a bar that stays (`leave`), then tqdm's clean-up
        without its final redraw (a carriage return or newline of its own)."""
        if self._plain and not getattr(self, "disable", True):
            if self.leave is not False and self.n:
                self._line()
            self.sp = None  # tqdm's close stops before redrawing a bar that has no display function
        super().close()

    def _line(self, msg: str | None = None) -> None:
        self.fp.write((msg or self.__str__()).strip() + "\n")
        self.fp.flush()
