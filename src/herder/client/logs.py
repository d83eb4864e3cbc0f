"""Reading a whole log page by page, for every client transport (HTTP and in-process)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from herder.api_models import LogView


class FullLogMixin:
    """``read_full_log`` on top of a client's ``read_log``."""

    def read_log(self, attempt_id: int, stream: str = "stdout", offset: int = 0) -> LogView:
        raise NotImplementedError

    def read_full_log(self, attempt_id: int, stream: str = "stdout") -> str:
        """Read a log from the start, page by page, until it is complete or stops growing."""
        parts: list[str] = []
        offset = 0
        while True:
            page = self.read_log(attempt_id, stream, offset)
            parts.append(page.data)
            if page.complete or page.next_offset <= offset:
                return "".join(parts)
            offset = page.next_offset
