"""The agent's index of each store directory it serves: what every name in it held when last read,
kept right by the directory's inotify events (watch.py), so an ADD on a full store reads only the
names that changed since the last call, whoever changed them. Off in one-shot processes."""

from __future__ import annotations

from cnikit import log

from .store import Holdings, Reservation

_INDEXES: dict[str, Index] = {}
_keep_indexes = False


def keep_indexes() -> None:
    """For a long-lived process (the agent): index each store instead of reading it whole."""
    global _keep_indexes
    _keep_indexes = True


class Index:
    """One store directory's names as last read (None: not a reservation) and its watch."""

    def __init__(self) -> None:
        from . import watch  # ctypes: only the agent pays for it, never a one-shot call

        self.watch = watch.Watch()
        self.entries: dict[str, Reservation | None] = {}
        self.holdings = Holdings()

    def changed(self, dir_fd: int) -> set[str] | None:
        """Names to read again, or None when the whole directory must be read."""
        try:
            same = self.watch.rewatch(dir_fd)
            names = self.watch.changed()
        except OSError:
            return None
        return names if same else None


def index_of(path: str) -> Index | None:
    """The index of the store directory `path`; None if indexes are not kept or cannot be."""
    if not _keep_indexes:
        return None
    index = _INDEXES.get(path)
    if index is None:
        try:
            index = _INDEXES[path] = Index()
        except OSError as exc:  # e.g. the inotify instance limit: read whole, as one-shot calls do
            log.process().warning("ipam_no_index", store=path, error=str(exc), effect="read whole")
    return index
