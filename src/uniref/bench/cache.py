"""Judgements cached on disk, so a killed benchmark run resumes without asking the judge again.

One JSON line per finished judgement in ``judgements.jsonl``, keyed by (benchmark, sample key, criterion,
SHA-256 of the output PNG file, prompt version, judge model): a regenerated output or a reworded prompt is
a new key, everything else is reused. Lines are appended under a lock and flushed one by one; a line cut
short by a kill is skipped on the next load (and counted in :attr:`JudgementCache.torn`), so the worst a
crash costs is the one judgement in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_FILE = "judgements.jsonl"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prompt_version(*texts: str) -> str:
    """A short fingerprint of a criterion's prompt texts: rewording a prompt invalidates its cached answers."""
    return hashlib.sha256("\x1f".join(texts).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Judgement:
    scores: list[float] | None  # None: every try failed (unscored, never a made-up number)
    reason: str  # the judge's reason, or what went wrong
    raw: str = ""  # the judge's full answer (the last one, when every try failed)

    def to_json(self) -> dict[str, Any]:
        return {"scores": self.scores, "reason": self.reason, "raw": self.raw}


class JudgementCache:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / CACHE_FILE
        self._lock = threading.Lock()
        self._entries: dict[str, Judgement] = {}
        self.torn = 0  # lines a killed run left unfinished
        self.hits = 0
        if self.path.exists():
            self._load()
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run, closed in close())
        if self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
            self._fh.write("\n")  # end a torn line, or the next judgement would be glued to it and lost too

    def _load(self) -> None:
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                self._entries[entry["key"]] = Judgement(entry["scores"], entry.get("reason", ""), entry.get("raw", ""))
            except (json.JSONDecodeError, KeyError, TypeError):
                self.torn += 1

    @staticmethod
    def key(*parts: str) -> str:
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

    def get(self, key: str) -> Judgement | None:
        """A finished judgement with scores. A failed one is not reused: the next run tries the judge again."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None and found.scores is not None:
                self.hits += 1
                return found
            return None

    def put(self, key: str, judgement: Judgement) -> None:
        with self._lock:
            self._entries[key] = judgement
            self._fh.write(json.dumps({"key": key, **judgement.to_json()}) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        with self._lock:
            self._fh.close()

    def __len__(self) -> int:
        return len(self._entries)
