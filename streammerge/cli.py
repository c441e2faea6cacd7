"""Command line: ``python -m streammerge {merge,unmerge,verify,finalize,demo} ...``. The only module that prints.

Exit status: 0 success, 1 ``verify`` found a problem, 2 bad input or environment (``error: …`` on stderr,
no traceback: one line, or a summary line and one line per problem), 130 interrupted (Ctrl-C), 143
terminated (SIGTERM), whatever the command and whenever the signal comes (``streammerge.interrupts``).
Library messages name arguments in backticks (`` `max_memory` ``); here each becomes its flag.
Unexpected exceptions keep their traceback: they are bugs.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import NoReturn

from streammerge import interrupts, process_policy
from streammerge.cli_args import build_parser, flag_for
from streammerge.errors import StreamMergeError
from streammerge.sizes import format_size

LOG = logging.getLogger("streammerge")

#: Problems listed under a many-problem error without ``-v``.
SHOWN_PROBLEMS = 20

_STOPPED = {
    "merge": "no partial shard was left under a final name; rerun the same command with --resume to continue",
    "verify": "verify stopped before it finished; nothing was changed",
    "demo": "the demo stopped before it finished",
    "finalize": "finalize stopped before it wrote the manifest; rerun it",
    None: "stopped while starting; nothing was written",
}
_STOPPED["unmerge"] = _STOPPED["merge"]


class _Formatter(logging.Formatter):
    """``LEVEL: message`` with the library's `` `argument` `` names turned into ``command``'s flags."""

    def __init__(self, command: str | None) -> None:
        super().__init__("%(levelname)s: %(message)s")
        self.command = command

    def format(self, record: logging.LogRecord) -> str:
        return cli_text(super().format(record), self.command)


@contextmanager
def _logging(level: int, command: str | None) -> Iterator[None]:
    """Route the library's log records to stderr for this call only (the root logger is left alone)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(command))
    previous = LOG.level, LOG.propagate
    LOG.addHandler(handler)
    LOG.setLevel(level)
    LOG.propagate = False
    try:
        yield
    finally:
        LOG.removeHandler(handler)
        LOG.setLevel(previous[0])
        LOG.propagate = previous[1]


def cli_text(message: str, command: str | None) -> str:
    """A library message with each `` `argument` `` replaced by the flag of ``command`` that sets it."""
    return re.sub(r"`([a-z_]+)`", lambda m: flag_for(command, m.group(1)) or m.group(1), message)


def error_lines(e: StreamMergeError, command: str | None, verbose: bool) -> list[str]:
    """``error: summary`` then the problems, one per line (at most SHOWN_PROBLEMS without ``-v``)."""
    shown = e.problems if verbose else e.problems[:SHOWN_PROBLEMS]
    lines = [f"error: {cli_text(e.summary, command)}", *(f"  {cli_text(p, command)}" for p in shown)]
    if len(shown) < len(e.problems):
        lines.append(f"  … and {len(e.problems) - len(shown)} more (pass -v for all)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    previous = {sig: signal.getsignal(sig) for sig in interrupts.EXIT}
    interrupts.running()
    process_policy.own()
    command: str | None = None
    dry_run = verbose = False
    try:
        args = build_parser(argv).parse_args(argv)
        command, dry_run, verbose = args.command, getattr(args, "dry_run", False), args.verbose
        level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO
        with _logging(level, command):
            return _run(args)
    except SystemExit as e:  # argparse: --help, --version, or an argument error (exit 2, usage on stderr)
        return e.code if isinstance(e.code, int) else 2
    except BaseException as e:
        sig = interrupts.cause(e)
        if sig is not None:
            interrupts.quiet()
            what = "the dry run stopped; nothing was written" if dry_run else _STOPPED[command]
            print(f"{interrupts.WORD[sig]}: {what}", file=sys.stderr)
            return interrupts.EXIT[sig]
        if isinstance(e, StreamMergeError):
            print("\n".join(error_lines(e, command, verbose)), file=sys.stderr)
            return 2
        if isinstance(e, BrokenPipeError):  # our reader left (``verify --out X | head -1``): end as a C tool
            _quiet_stdout()  # would on SIGPIPE, without a traceback or a second error when stdout is flushed
            return 128 + 13
        raise
    finally:
        try:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass


def _quiet_stdout() -> None:
    with suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from streammerge.demo import run_demo

        report = run_demo(args.keep)
        print(report)
        return 0
    if args.command == "verify":
        return _verify(args)
    if args.command == "finalize":
        from streammerge.api import finalize

        report = finalize(args.out)
        if not args.quiet:
            print(f"finalized {args.out}: {report.shards} shard(s), {format_size(report.bytes_written)}")
        return 0
    return _merge(args)


def _split(args: argparse.Namespace) -> dict[str, object]:
    """merge's ``part``/``executor`` arguments from --part, --ray, --parts, or a Slurm array's environment."""
    if getattr(args, "ray", None) is not None:
        if args.part is not None:
            raise StreamMergeError("--part and --ray exclude each other: --ray runs every part itself")
        return {"executor": "ray", "ray_address": args.ray or None, "parts": args.parts}
    if getattr(args, "parts", None) is not None:
        raise StreamMergeError("--parts goes with --ray; for one part of a split merge use --part I/N")
    part = getattr(args, "part", None)
    if part == "all":  # one process, whatever a Slurm array says
        return {}
    if part is None and args.command == "merge":
        from streammerge.parts import part_from_slurm

        found = part_from_slurm(os.environ)
        if found is not None:
            LOG.info("part %s from SLURM_ARRAY_TASK_ID=%s (SLURM_ARRAY_TASK_COUNT=%s, SLURM_ARRAY_TASK_MIN=%s); "
                     "pass --part to override", found, os.environ["SLURM_ARRAY_TASK_ID"],
                     os.environ["SLURM_ARRAY_TASK_COUNT"], os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            return {"part": found}
    return {"part": part} if part is not None else {}


def _bar(args: argparse.Namespace, desc: str):  # -> tqdm
    from tqdm import tqdm

    return tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1000, disable=True if args.quiet else None,
                desc=desc, file=sys.stderr)


def _verify(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from streammerge import changes
    from streammerge.verify import verify

    bar = _bar(args, "verifying")

    def on_start(total: int) -> None:
        bar.total = total
        bar.refresh()

    with logging_redirect_tqdm(loggers=[LOG]), bar:
        report = verify(out=args.out, base=args.base, adapters=args.adapter or (), adapter_name=args.adapter_name,
                        sample=args.sample, device=args.device, workers=args.workers, on_progress=bar.update,
                        on_start=on_start, base_subfolder=args.base_subfolder, against_base=args.against_base)
    print(report.summary())
    if not args.quiet:
        print("\n".join(changes.summary_lines(report.changes, every=args.verbose)))
    return 0 if report.ok else 1


def _merge(args: argparse.Namespace) -> int:
    # No torch here: it is imported when the first block is computed, so errors found while planning
    # return at once, and the raw copies start while torch loads (``streammerge.scatter``).
    from tqdm.contrib.logging import logging_redirect_tqdm

    from streammerge import changes
    from streammerge.api import DEFAULT_MAX_MEMORY, merge, unmerge
    from streammerge.budget import default_workers

    workers = default_workers() if args.workers is None else args.workers
    if workers < 1:
        raise StreamMergeError(f"`workers` {workers}: must be at least 1")
    bar = _bar(args, "unmerging" if args.command == "unmerge" else "merging")

    def on_plan(plan: object) -> None:
        bar.total = plan.total_bytes  # type: ignore[attr-defined]
        bar.refresh()
        if args.verbose:
            _log_targets(plan)
        if args.dry_run:
            bar.clear()
            print(plan.summary())  # type: ignore[attr-defined]

    with logging_redirect_tqdm(loggers=[LOG]), bar:
        common = dict(
            adapter_name=args.adapter_name, device=args.device, workers=workers, max_shard_size=args.max_shard_size,
            max_memory=args.max_memory or DEFAULT_MAX_MEMORY, dry_run=args.dry_run, overwrite=args.overwrite,
            allow_nonfinite=args.allow_nonfinite, on_progress=bar.update, on_plan=on_plan, resume=args.resume,
            checksum=args.checksum, direct_io=not args.buffered_io,
        )
        if args.command == "unmerge":
            report = unmerge(args.merged, args.adapter, args.out, weight=args.weight, force=args.force,
                             base=args.base, **common)
        else:
            report = merge(
                base=args.base, adapters=args.adapter or (), out=args.out, weights=args.weights,
                combination=args.combination, density=args.density, seed=args.seed, heads_from=args.heads_from,
                pattern_rules=args.pattern_rules, base_subfolder=args.base_subfolder, dequantize=args.dequantize,
                **common, **_split(args),
            )
    if not args.quiet or args.dry_run:
        print(report.summary())
    if not args.quiet and not args.dry_run:
        print("\n".join(changes.summary_lines(report.changes, every=args.verbose)))
        print(f"check it with: {verify_command(report)}")
    return 0


def verify_command(report: object) -> str:
    """The ``streammerge verify`` command line that checks what ``report``'s run wrote (the inputs and options
    are read back from its manifest)."""
    return shlex.join(["streammerge", "verify", "--out", report.out])  # type: ignore[attr-defined]


def _log_targets(plan: object) -> None:
    """``-v``: every tensor the plan changes, with each adapter term's layout, scale and weight."""
    for task in plan.tasks():  # type: ignore[attr-defined]
        if not task.steps:
            continue
        terms = "; ".join(
            f"{t.layout} scale {t.scale:g}" + (f" weight {t.weight:g}" if t.weight != 1.0 else "")
            + (f" ({t.origin})" if t.origin else "")
            for step in task.steps for t in step.terms
        )
        LOG.debug("%s %s %s%s: %s", task.kind, task.name, task.dtype, list(task.shape), terms)
    LOG.debug("output total %s", format_size(plan.total_bytes))  # type: ignore[attr-defined]


def entrypoint() -> NoReturn:
    """Console-script and ``python -m streammerge`` entry point: ``main``, then exit without the interpreter's
    teardown, which costs ~0.4 s once torch is loaded (``python -c "import torch"``: 1.53 s, 1.14 s with
    ``os._exit``), after every output file is already fsynced and closed. Logging and stdio are flushed
    first. A process that imported Ray exits normally: Ray's atexit hook stops what it started."""
    code = main()
    if "ray" in sys.modules:
        raise SystemExit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


__all__ = ["cli_text", "entrypoint", "error_lines", "main", "verify_command"]
