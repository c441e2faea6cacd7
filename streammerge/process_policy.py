"""Whether streammerge owns the process it runs in.

``python -m streammerge`` (``cli.main``) does, so a merge may start a helper process there
(``copier_process``). A library caller's process is the caller's: no interpreter is started behind its back
(its ``sys.executable`` may not even be a Python that can run one), and what a run changes in it (torch's
thread count) is restored when the run ends.
"""

from __future__ import annotations

_owned = [False]


def own() -> None:
    """Called by the CLI before it runs a command."""
    _owned[0] = True


def owned() -> bool:
    return _owned[0]
