"""Stopping when asked: SIGTERM (what schedulers and pre-emption send) and Ctrl-C make a long job stop at its
next safe point (after the current optimizer step, or the current image) instead of dying in the middle of a
write. A second Ctrl-C stops at once.

Python's default turns Ctrl-C into a KeyboardInterrupt wherever the program happens to be, and SIGTERM kills it
outright: neither leaves a checkpoint. A job asks `stop.requested` at its safe points and raises `Stopped`, which
the command line turns into one line and exit status 128 + the signal number (the shell's convention).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """A job stopped at a safe point because a signal asked it to; its message says how to continue."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@dataclass
class StopRequest:
    """Set by the signal handler; read by the job at its safe points."""

    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def stop(self, message: str) -> None:
        """Raise `Stopped` with `message` if a signal asked to stop; else nothing."""
        if self.signum is not None:
            raise Stopped(self.signum, message)


_current: StopRequest | None = None  # the request of the outermost active block (a sweep's, around its trials)


@contextlib.contextmanager
def stop_requests(safe_point: str) -> Iterator[StopRequest]:
    """For the block, SIGTERM and SIGINT set the yielded request (and say so on stderr) instead of ending the
    process; a second SIGINT raises KeyboardInterrupt at once. Nested blocks share the outer block's request.
    Outside the main thread (where Python cannot install handlers) the request is never set, and a signal the
    process ignores is left ignored."""
    global _current
    if _current is not None:
        yield _current
        return
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame) -> None:
        if request.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if request.signum is None:
            request.signum = signum
            print(f"\n{signal.Signals(signum).name}: stopping after the current {safe_point} "
                  "(Ctrl-C again to stop at once)", file=sys.stderr)

    # A signal the parent set to be ignored (SIGINT for a shell's background job) stays ignored.
    previous = {signum: signal.signal(signum, handle) for signum in HANDLED
                if signal.getsignal(signum) is not signal.SIG_IGN}
    _current = request
    try:
        yield request
    finally:
        _current = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
