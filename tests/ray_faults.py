"""Fault injection for the Ray tests, installed in every Ray worker by ``worker_process_setup_hook``.

When the file named by ``STREAMMERGE_TEST_KILL_ARM`` exists, the first worker to write tensor
bytes into a shard (past its header) SIGKILLs itself, once (an ``O_EXCL`` marker file beside the
arm file records that it fired). This is a real worker death in the middle of a shard, as the OOM
killer would cause; Ray must notice it and retry the task.
"""

from __future__ import annotations

import os
import signal


def install() -> None:
    arm = os.environ.get("STREAMMERGE_TEST_KILL_ARM")
    if not arm:
        return
    from streammerge import writer

    def fire(shard) -> None:
        if shard.path.suffix == ".safetensors" and os.path.exists(arm):
            try:
                os.close(os.open(arm + ".fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os.kill(os.getpid(), signal.SIGKILL)

    pwrite, copy_in = writer.ShardFile.pwrite, writer.ShardFile.copy_in

    def pwrite_hook(self, offset, data):
        pwrite(self, offset, data)
        if offset > 0:  # tensor bytes (the header is written at offset 0)
            fire(self)

    def copy_in_hook(self, src_fd, src_offset, offset, count, buffer=None, feed=None):
        n = copy_in(self, src_fd, src_offset, offset, count, buffer, feed)
        fire(self)
        return n

    writer.ShardFile.pwrite = pwrite_hook
    writer.ShardFile.copy_in = copy_in_hook
