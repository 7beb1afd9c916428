"""Progress bars on stderr for long steps, silent when asked or when nobody is watching."""
from __future__ import annotations

from tqdm import tqdm


class Progress:
    def __init__(self, description: str, total: int | None = None, enabled: bool = True):
        self._bar = tqdm(total=total, desc=description, unit="batch", leave=False, disable=not enabled)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()

    def update(self, count: int = 1) -> None:
        self._bar.update(count)
