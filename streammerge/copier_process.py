"""Copies on a process of its own while torch loads.

torch's import holds the GIL for its module bodies and for the whole ``dlopen`` of its library (~0.7 s
here). A copier *thread* needs the GIL back between two system calls, so while torch loaded it copied at
0.6-0.8 GB/s instead of ~1.1 (RESULTS.md, fourth session). A child process has a GIL of its own.

``CopyProcess.copy`` sends the child one copy run (paths and offsets: one JSON line on its stdin) and waits
for its answer (one line on its stdout). The child writes the bytes into the parent's temporary file with
``writer.ShardFile.copy_in``, the code a copier thread runs, so the bytes are the same; the parent counts
them and hashes them after the load (``copies.hash_copied``), as it does for runs a thread copied then.

Only the CLI's runs start one (``process_policy``): a library caller's process is not streammerge's to start
interpreters from, and has usually imported torch already. The child starts in a session of its own (Ctrl-C
in a terminal is the parent's to handle: it kills the child when the run ends) and ends when its stdin closes,
so also when the parent dies. If the child cannot start or dies, the copier threads copy themselves: the run
is only slower.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

from streammerge import diskio
from streammerge.errors import OutputError
from streammerge.writer import ShardFile

LOG = logging.getLogger(__name__)
#: The child's copy buffer is aligned to this: direct writes to any filesystem block up to it (larger: buffered).
_ALIGN = 1 << 16


class CopyProcess:
    """A child process that runs copy runs (``copy``); ``close`` ends it."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self._proc = proc
        self._lock = threading.Lock()
        self._waiting: dict[int, Future] = {}
        self._next = 0
        self._closed = False
        self._gone = False  # the child ended: copies stay on threads
        self._reader = threading.Thread(target=self._read, name="streammerge-copier-process", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, buffer_size: int) -> CopyProcess | None:
        """The child, copying through a ``buffer_size``-byte buffer; None where it cannot start."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # this process's streammerge
        try:
            proc = subprocess.Popen([sys.executable, "-m", __name__, str(buffer_size)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                    start_new_session=True)  # its end is logged here, never a traceback
        except OSError as e:
            LOG.debug("copies stay on threads: no copier process (%s)", e)
            return None
        return cls(proc)

    def copy(self, file: ShardFile, src: str, src_offset: int, offset: int, count: int) -> bool:
        """Copy ``count`` bytes at ``src_offset`` of base file ``src`` to ``offset`` of ``file`` in the child.
        False: the child is gone, nothing was counted (copy them here). Raises ``OutputError`` for a write
        the child could not make, ``sources.Stopped`` once ``close`` has been called."""
        from streammerge.sources import Stopped  # here: the child imports this module, and needs no sources

        fut: Future = Future()
        line = json.dumps({"path": str(file.path), "tmp": file.temporary, "size": file.size, "direct": file.align > 0,
                           "src": src, "src_offset": src_offset, "offset": offset, "count": count})
        with self._lock:
            if self._closed:
                raise Stopped
            if self._gone:
                return False
            self._next += 1
            self._waiting[self._next] = fut
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(f"{self._next} {line}\n".encode())
                self._proc.stdin.flush()
            except OSError:  # the child is gone; its reader fails what still waits
                pass
        error = fut.result()
        if error is None:
            if self._closed:
                raise Stopped
            return False
        if error:
            raise OutputError(error)
        file.count(count)
        return True

    def _read(self) -> None:
        """Answer each waiting copy: "" when done, the error's message, None when the child ended first."""
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            key, _, error = raw.decode(errors="replace").rstrip("\n").partition(" ")
            with self._lock:
                fut = self._waiting.pop(int(key), None) if key.isdigit() else None
            if fut is None:  # not an answer of ours (something else printed): end it, copy on threads
                LOG.debug("the copier process wrote %r; ending it", raw[:80])
                self._proc.kill()
                continue
            fut.set_result(error)
        with self._lock:
            waiting, self._waiting = self._waiting, {}
            self._gone = True
            if not self._closed:
                LOG.debug("the copier process ended (exit %s); copies go on on threads", self._proc.poll())
        for fut in waiting.values():
            fut.set_result(None)

    def close(self) -> None:
        """End the child now. A run it was copying is cut short: its file is the parent's to delete."""
        with self._lock:
            self._closed = True
        self._proc.kill()
        self._proc.wait()
        self._reader.join()
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):  # BrokenPipeError flushing a request the child never read
                    pipe.close()


def main(argv: list[str]) -> None:
    """The child: copy each run its stdin asks for, in turn; answer each on stdout ("KEY" or "KEY error")."""
    mm, buffer = diskio.aligned_buffer(int(argv[0]), _ALIGN)
    files: dict[str, ShardFile] = {}
    sources: dict[str, int] = {}
    for raw in sys.stdin.buffer:
        key, _, line = raw.decode().partition(" ")
        req = json.loads(line)
        error = ""
        try:
            if req["src"] not in sources:
                sources[req["src"]] = os.open(req["src"], os.O_RDONLY)
            if req["tmp"] not in files:
                files[req["tmp"]] = ShardFile.attach(Path(req["path"]), req["tmp"], req["size"], req["direct"])
            f = files[req["tmp"]]
            f.copy_in(sources[req["src"]], req["src_offset"], req["offset"], req["count"],
                      buffer if 0 < f.align <= _ALIGN else None)
        except OutputError as e:
            error = str(e)
        except OSError as e:
            error = f"{req['src']}: cannot read ({e.strerror or e})"
        sys.stdout.buffer.write(f"{key} {error}".rstrip(" ").encode() + b"\n")
        sys.stdout.buffer.flush()
    del buffer
    mm.close()


if __name__ == "__main__":
    main(sys.argv[1:])
