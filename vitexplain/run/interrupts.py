"""Ctrl-C that stops a run between batches, never inside the DataLoader.

A ``KeyboardInterrupt`` raised wherever the main thread happens to be can land while it is receiving a
batch from a DataLoader worker (torch passes tensors as file descriptors, over a handshake with the
worker): the worker then prints a traceback of the broken handshake. Inside :class:`StopRequests` the
first SIGINT only records the request; the run checks it between batches and stops there, with every
computed output finished. A second SIGINT raises at once, for a run that must stop now.

DataLoader workers ignore SIGINT (:func:`ignore_interrupts`): a terminal's Ctrl-C reaches the whole
process group, and it is the main process that decides when they stop.
"""
from __future__ import annotations

import signal
import threading
from typing import Callable


class StopRequests:
    """Record SIGINT while inside ``with``; :meth:`raise_if_requested` turns a request into
    ``KeyboardInterrupt`` at a point of the caller's choosing. ``on_request`` is called on the first one.
    Outside the main thread (where Python cannot handle signals) nothing is installed and Ctrl-C raises
    where it lands, as usual."""

    def __init__(self, on_request: Callable[[], None] = lambda: None):
        self.on_request = on_request
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _record(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.on_request()

    def raise_if_requested(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


def ignore_interrupts(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: SIGINT is for the main process, which shuts the workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
