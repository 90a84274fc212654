"""Progress of work counted in bytes (a model's load, a span's weight transfer), reported on stderr.

On a terminal: a rich bar (bytes, rate, ETA). Anywhere else (a pipe, a log file, a service's journal):
plain lines, so a log shows how far it got without a terminal's control codes. A line at the start,
one each time another tenth is done (at most one a second), one at least every 10 s while bytes keep
coming, and one at the end with the bytes, the time taken and the rate.

Both go to stderr, and the choice between them follows stderr, not stdout: stdout carries the answer
(`duskpool run ... > answer.txt` still shows the bar on the terminal), and every other diagnostic
duskpool prints is on stderr too (`2> load.log` gets plain lines, not a bar's redraws).

Callers advance once per tensor, not per byte, so reporting costs nothing next to the reads.
"""

import sys
import time
from collections.abc import Callable
from typing import TextIO

MIN_LINE_GAP_S = 1.0  # a tenth done sooner than this after the last line waits for the next line
MAX_LINE_GAP_S = 10.0  # while bytes keep coming, a line at least this often even if no tenth was done


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or already closed
        return False


class Progress:
    """`total` bytes of work called `label`: a rich bar on a terminal, plain lines otherwise, nothing
    when not `enabled`. `advance(n)` as bytes are done, `close()` (or leave a `with`) at the end."""

    def __init__(self, label: str, total: int, enabled: bool = True, *, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.done = label, total, 0
        self._stream = sys.stderr if stream is None else stream
        self._clock = clock
        self._bar = None
        self._plain = False
        self._closed = not enabled
        if not enabled:
            return
        self._started = self._last_line = clock()
        if _is_terminal(self._stream):
            from rich.console import Console
            from rich.progress import DownloadColumn, TransferSpeedColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(*Bar.get_default_columns(), DownloadColumn(), TransferSpeedColumn(),
                            console=Console(file=self._stream), transient=False)
            self._task = self._bar.add_task(label, total=total)
            self._bar.start()
        else:
            self._plain = True
            self._next_tenth = 1
            self._line(f"{_size(total)} to go")

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.advance(self._task, n)
        elif self._plain and not self._closed and self.done < self.total:
            now = self._clock()
            tenth = self.done * 10 // self.total
            since = now - self._last_line
            if (tenth >= self._next_tenth and since >= MIN_LINE_GAP_S) or since >= MAX_LINE_GAP_S:
                self._next_tenth = tenth + 1
                elapsed = now - self._started
                rate = self.done / elapsed if elapsed > 0 else 0.0
                eta = f", ETA {_duration((self.total - self.done) / rate)}" if rate > 0 else ""
                self._line(f"{_size(self.done)} of {_size(self.total)} ({100 * self.done // self.total}%), "
                           f"{_size(rate)}/s{eta}", now)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.stop()
            return
        elapsed = self._clock() - self._started
        rate = f", {_size(self.done / elapsed)}/s" if elapsed > 0 else ""
        if self.done == self.total:
            self._line(f"done, {_size(self.done)} in {_duration(elapsed)}{rate}")
        else:
            self._line(f"ended at {_size(self.done)} of {_size(self.total)} after {_duration(elapsed)}{rate}")

    def _line(self, text: str, now: float | None = None) -> None:
        self._last_line = self._clock() if now is None else now
        print(f"duskpool: {self.label}: {text}", file=self._stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
