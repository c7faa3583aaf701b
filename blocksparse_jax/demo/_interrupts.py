"""SIGINT and SIGTERM for the demo: raised where that is safe, recorded where it is not."""

from __future__ import annotations

import contextlib
import gc
import signal
import threading


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT or SIGTERM; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Interrupts:
    """SIGINT and SIGTERM as :class:`Interrupted`, raised where it is safe.

    Outside :meth:`deferred` blocks a signal raises at once, except inside a
    garbage-collector callback or a ``__del__`` method, where Python would
    print the exception and drop it: there it is only recorded, and the next
    :meth:`check` raises it.  Inside :meth:`deferred` blocks a signal is only
    recorded (``signum``); a second one raises at once and sets ``forced``.

    Used as a context manager, it installs its handler (from the main thread
    only: elsewhere signals keep their handlers).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.forced = False
        self._defer = 0
        self._previous: dict = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None and self._defer:
            self.forced = True
            raise Interrupted(signum)
        if self.signum is None:
            self.signum = signum
        if not self._defer and not _in_finalizer(frame):
            raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self):
        """Signals in the block are recorded, not raised (a second one raises)."""
        self._defer += 1
        try:
            yield self
        finally:
            self._defer -= 1

    def check(self) -> None:
        """Raises :class:`Interrupted` if a signal arrived and was not raised yet."""
        if self.signum is not None:
            raise Interrupted(self.signum)


def _in_finalizer(frame) -> bool:
    """Whether ``frame`` runs a garbage-collector callback or a ``__del__`` method."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False
