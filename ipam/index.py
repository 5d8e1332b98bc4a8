"""A long-lived process's index of each store directory it serves (the agent's): what every name
in it held when last read, kept right by the directory's inotify events (watch.py), so an ADD on a
full store reads only the names that changed since the last call, whoever changed them. One-shot
processes keep none: their stores read the directory whole."""

from __future__ import annotations

from cnikit import log

from .store import Holdings, Reservation


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


class Indexes:
    """The indexes a process keeps, one per store directory, made at its first use."""

    def __init__(self) -> None:
        self._by_path: dict[str, Index] = {}

    def of(self, path: str) -> Index | None:
        """The index of the store directory `path`; None if it cannot be kept (read whole)."""
        index = self._by_path.get(path)
        if index is None:
            try:
                index = self._by_path[path] = Index()
            except OSError as exc:  # e.g. the inotify instance limit: read whole, as one-shot calls do
                log.process().warning("ipam_no_index", store=path, error=str(exc), effect="read whole")
        return index

    def close(self) -> None:
        for index in self._by_path.values():
            index.watch.close()
        self._by_path.clear()
