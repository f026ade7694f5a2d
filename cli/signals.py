"""``SIGTERM`` handled like Ctrl-C, for every ``wan`` command.

A job scheduler, ``timeout`` or ``docker stop`` ends a process with ``SIGTERM``. Python's default
is to die on the spot, which skips every ``finally``: temporary files stay behind. Turned into a
``KeyboardInterrupt`` it unwinds like Ctrl-C: writers delete their temporaries, click prints
``Aborted!`` and the exit status is 1 (``kill -9`` cannot be caught; what it leaves is cleaned by
the next run in that folder).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives ``SIGTERM``."""


def _on_sigterm(signum: int, frame: object) -> None:
    # restore the default first: a second SIGTERM while unwinding ends the process at once
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print("\nwan: received SIGTERM, stopping (temporary files are removed)", file=sys.stderr, flush=True)
    raise Terminated("SIGTERM")


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, ``SIGTERM`` raises :class:`Terminated` (a ``KeyboardInterrupt``) in the main
    thread; the previous handler is restored afterwards. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
