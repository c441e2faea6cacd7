"""One interrupt policy for every command: Ctrl-C exits 130, SIGTERM exits 143, one line, no traceback.

Imports nothing heavy, so ``python -m streammerge`` installs ``startup`` before torch is imported:
until the command is running, a signal ends the process at once (nothing has been written yet).
``running`` then makes SIGINT raise ``KeyboardInterrupt`` and SIGTERM raise ``Terminated`` in the main
thread, so that the writers' cleanup runs; ``cause`` finds either one behind whatever exception a
cleanup raised on the way out (``verify``'s ``BufferError`` from a memory map closed mid-read).
"""

from __future__ import annotations

import os
import signal

#: Exit status per signal: 128 + the signal number, as shells report a death by that signal.
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
WORD = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so cleanup runs as it does for Ctrl-C."""


def startup() -> None:
    """Until ``running``: a signal writes one line and exits with its status at once."""

    def handler(signum: int, frame: object) -> None:
        os.write(2, f"{WORD[signum]}: stopped while starting; nothing was written\n".encode())
        os._exit(EXIT[signum])

    for sig in EXIT:
        signal.signal(sig, handler)


#: The signal received since ``running`` (None: none). An interrupt that lands inside an import can leave a
#: half-initialised C extension behind, and the next import of it raises an ImportError whose chain no
#: longer shows the KeyboardInterrupt: ``cause`` then still knows that a signal is why the command failed.
_received: list[int] = []


def running() -> None:
    """SIGINT raises KeyboardInterrupt, SIGTERM raises Terminated (main thread only; elsewhere a no-op)."""
    _received.clear()

    def interrupt(signum: int, frame: object) -> None:
        _received.append(signum)
        raise KeyboardInterrupt

    def terminate(signum: int, frame: object) -> None:
        _received.append(signum)
        raise Terminated

    try:
        signal.signal(signal.SIGINT, interrupt)
        signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (main() called from a worker thread, e.g. in tests)
        pass


def quiet() -> None:
    """Once an interrupt is being reported: further signals end the process with the same status, silently."""

    def handler(signum: int, frame: object) -> None:
        os._exit(EXIT[signum])

    try:
        for sig in EXIT:
            signal.signal(sig, handler)
    except ValueError:
        pass


def cause(exc: BaseException | None) -> int | None:
    """The signal behind ``exc`` (itself, or its context/cause chain; else one received while running), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KeyboardInterrupt):
            return signal.SIGINT
        if isinstance(exc, Terminated):
            return signal.SIGTERM
        exc = exc.__cause__ or exc.__context__
    return _received[0] if _received else None
