"""``python -m streammerge``: the signal policy goes in first, before anything heavy is imported."""

from streammerge import interrupts

interrupts.startup()

from streammerge.cli import entrypoint  # noqa: E402  (after the handlers, on purpose)

entrypoint()
