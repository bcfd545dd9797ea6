"""Reading a body of unknown size with a cap that the bytes, not a header, enforce."""

from __future__ import annotations

from collections.abc import Callable


class CappedBuffer:
    """Collects chunks; `add` raises `too_large()` as soon as the total passes `cap`."""

    def __init__(self, cap: int, too_large: Callable[[], Exception]) -> None:
        self.cap = cap
        self.size = 0
        self._too_large = too_large
        self._chunks: list[bytes] = []

    def check_declared(self, declared: str | int | None) -> None:
        """Refuse at once when an honest sender says it is too big (Content-Length)."""
        if isinstance(declared, str):
            declared = int(declared) if declared.isdigit() else None
        if declared is not None and declared > self.cap:
            raise self._too_large()

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.cap:
            raise self._too_large()
        self._chunks.append(chunk)

    def getvalue(self) -> bytes:
        return b"".join(self._chunks)
