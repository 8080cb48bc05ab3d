"""A tiny progress bar (no tqdm): ``[#####-----] 3/10  model/resnet50/train/bf16/b32/eager``."""
import sys
import time


class Progress:
    def __init__(self, total: int, width: int = 24, stream=None):
        self.total, self.width = max(0, total), width
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.t0 = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def bar(self, label: str = "") -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        elapsed = time.perf_counter() - self.t0
        return f"[{'#' * filled}{'-' * (self.width - filled)}] {self.done}/{self.total} {elapsed:6.1f}s  {label}"

    def start(self, label: str) -> None:
        """Show the case about to run (the bar counts finished cases)."""
        self._write(self.bar(label))

    def advance(self, label: str = "") -> None:
        self.done = min(self.total, self.done + 1)
        if self.tty:
            self._write(self.bar(label))

    def close(self) -> None:
        self._write(self.bar("done"))
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()

    def _write(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + text[:160])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
