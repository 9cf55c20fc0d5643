"""The semantic cache's in-process vector index: one per scope, a copy of what Redis holds.

Vectors are kept per *context* (the digest of everything but the last user turn), so a
search compares only entries whose request differs in that turn alone. Each context's
vectors are rows of one float32 matrix, grown by doubling and kept dense (a removed row is
replaced by the last), so a search is one matrix-vector product: 10,000 rows of 512 take
well under a millisecond. worker.semantic keeps the copy in step with Redis; nothing here
does I/O.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Found(NamedTuple):
    """The nearest live entry of a context: its id and cosine similarity."""

    entry_id: str
    similarity: float


class _Block:
    """One context's rows."""

    def __init__(self, dims: int) -> None:
        self.ids: list[str] = []
        self.vectors = np.zeros((8, dims), dtype=np.float32)
        self.at_ms = np.zeros(8, dtype=np.int64)

    def add(self, entry_id: str, vector: np.ndarray, at_ms: int) -> int:
        row = len(self.ids)
        if row == len(self.at_ms):
            self.vectors = np.concatenate([self.vectors, np.zeros_like(self.vectors)])
            self.at_ms = np.concatenate([self.at_ms, np.zeros_like(self.at_ms)])
        self.vectors[row], self.at_ms[row] = vector, at_ms
        self.ids.append(entry_id)
        return row

    def remove(self, row: int) -> str | None:
        """Drop a row; the id of the row moved into its place, if any."""
        last = len(self.ids) - 1
        moved = None
        if row != last:
            self.vectors[row], self.at_ms[row] = self.vectors[last], self.at_ms[last]
            moved = self.ids[row] = self.ids[last]
        self.ids.pop()
        return moved


class ScopeIndex:
    """One scope's entries in memory. `epoch`, `n` and `log_id` say which state of Redis it
    copies (worker.semantic's sync)."""

    def __init__(self) -> None:
        self.epoch: str | None = None
        self.n = 0
        self.log_id = "0-0"
        self._blocks: dict[str, _Block] = {}
        self._where: dict[str, tuple[str, int]] = {}  # entry id -> (context, row)

    def __len__(self) -> int:
        return len(self._where)

    def clear(self) -> None:
        self._blocks.clear()
        self._where.clear()

    def add(self, entry_id: str, context: str, vector: np.ndarray, at_ms: int) -> None:
        """Add (or replace) an entry. A vector of another length than the context's is not
        comparable and is left out (the context's key includes the embedder, so this is
        only a damaged entry)."""
        self.remove(entry_id)
        block = self._blocks.get(context)
        if block is None:
            block = self._blocks[context] = _Block(len(vector))
        if len(vector) != block.vectors.shape[1]:
            return
        self._where[entry_id] = (context, block.add(entry_id, vector, at_ms))

    def remove(self, entry_id: str) -> None:
        place = self._where.pop(entry_id, None)
        if place is None:
            return
        context, row = place
        block = self._blocks[context]
        moved = block.remove(row)
        if moved is not None:
            self._where[moved] = (context, row)
        if not block.ids:
            del self._blocks[context]

    def nearest(self, context: str, query: np.ndarray, since_ms: int) -> Found | None:
        """The most similar entry of `context` written at or after `since_ms` (older ones
        have expired in Redis), or None."""
        block = self._blocks.get(context)
        if block is None or len(query) != block.vectors.shape[1]:
            return None
        size = len(block.ids)
        similarity = block.vectors[:size] @ query
        similarity[block.at_ms[:size] < since_ms] = -2.0
        row = int(np.argmax(similarity))
        if similarity[row] < -1.5:
            return None
        return Found(block.ids[row], float(similarity[row]))
