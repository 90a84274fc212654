"""Progress bars for weight transfers: rich on a terminal, nothing otherwise."""

import sys


class Progress:
    """A rich progress bar on stderr (bytes, rate, ETA), or nothing."""

    def __init__(self, label: str, total: int, enabled: bool):
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

            self._bar = Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(),
                                 console=Console(file=sys.stderr), transient=False)
            self._task = self._bar.add_task(label, total=total)
            self._bar.start()

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
