"""Command line: ``python -m streammerge {merge,verify,demo} ...``. The only module that prints.

Exit status: 0 success, 1 ``verify`` found a problem, 2 bad input or environment (one ``error: …`` line on stderr, no
traceback), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Unexpected exceptions keep their
traceback: they are bugs.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from streammerge import __version__
from streammerge.errors import StreamMergeError

LOG = logging.getLogger("streammerge")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``5GB`` → 5·10⁹ bytes (HF convention), ``512MiB`` → 512·2²⁰, ``1000`` → 1000."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 5GB, 512MB, 1GiB or a byte count")
    value = float(m.group(1)) * _UNITS[m.group(2) or ""]
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least one byte")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streammerge",
        description="Fold PEFT LoRA adapters into a safetensors checkpoint, streaming, in bounded memory.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("merge", help="merge adapter(s) into a base checkpoint and write a new checkpoint")
    m.add_argument("--base", help="base checkpoint directory or .safetensors file "
                   "(default: base_model_name_or_path of the adapter, local or in the HF cache)")
    m.add_argument("--adapter", action="append", required=True, metavar="DIR",
                   help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--adapter-name", metavar="NAME", help="adapter sub-directory to use when DIR holds several")
    m.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    m.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, or cuda[:N] (default: auto)")
    m.add_argument("--workers", type=int, metavar="N", help="compute threads (default: min(4, cores))")
    m.add_argument("--max-shard-size", type=parse_size, metavar="SIZE",
                   help="re-shard the output (e.g. 5GB); default keeps the base's shard layout")
    m.add_argument("--max-memory", type=parse_size, metavar="SIZE", default=None,
                   help="working-memory budget for merge blocks (default 512MiB); RSS ≈ 250 MB + this")
    m.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    m.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    m.add_argument("--resume", action="store_true",
                   help="continue an interrupted merge into --out: keep shards whose recorded inputs, options and "
                   "checksum still match, recompute the rest (same bytes as an uninterrupted run)")
    m.add_argument("--allow-nonfinite", action="store_true", help="write NaN/inf results instead of stopping")
    _common(m)

    v = sub.add_parser("verify", help="check a merged directory against its base and adapter(s); exit 0 good, 1 not")
    v.add_argument("--out", required=True, metavar="DIR", help="the merged directory to check")
    v.add_argument("--base", help="base checkpoint directory (default: base_model_name_or_path of the adapter)")
    v.add_argument("--adapter", action="append", required=True, metavar="DIR", help="the adapter(s) that were merged")
    v.add_argument("--adapter-name", metavar="NAME", help="adapter sub-directory to use when DIR holds several")
    v.add_argument("--sample", type=int, metavar="N",
                   help="recompute at least N rows per merged tensor (whole 64-row blocks) instead of all rows")
    v.add_argument("--device", default="cpu", help="device for the recomputation (default: cpu)")
    v.add_argument("--workers", type=int, metavar="N", help="compute threads (default: min(4, cores))")
    _common(v)

    d = sub.add_parser("demo", help="build a tiny base + adapter in a temporary directory, merge, verify")
    d.add_argument("--keep", metavar="DIR", help="build the demo in DIR and keep it (default: a temp dir)")
    _common(d)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors; no progress bar")


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so cleanup runs as it does for Ctrl-C."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. main() called from a worker in tests)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_STOPPED = "no partial shard was left under a final name; rerun the same command with --resume to continue"


@contextmanager
def _logging(level: int) -> Iterator[None]:
    """Route the library's log records to stderr for this call only (the root logger is left alone)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO
    try:
        with _sigterm_raises(), _logging(level):
            return _run(args)
    except StreamMergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {_STOPPED}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"terminated: {_STOPPED}", file=sys.stderr)
        return 143


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from streammerge.demo import run_demo

        report = run_demo(args.keep)
        print(report)
        return 0
    if args.command == "verify":
        return _verify(args)
    return _merge(args)


def _verify(args: argparse.Namespace) -> int:
    from streammerge.verify import verify

    report = verify(out=args.out, base=args.base, adapters=args.adapter, adapter_name=args.adapter_name,
                    sample=args.sample, device=args.device, workers=args.workers)
    print(report.summary())
    return 0 if report.ok else 1


def _merge(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from streammerge.api import DEFAULT_MAX_MEMORY, merge
    from streammerge.execute import default_workers

    workers = args.workers or default_workers()
    if workers < 1:
        raise StreamMergeError(f"--workers {workers}: must be at least 1")
    # Each worker runs torch ops; split the cores between them instead of oversubscribing.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    plan_holder = []
    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, disable=True if args.quiet else None,
               desc="merging", file=sys.stderr)

    def on_plan(plan: object) -> None:
        plan_holder.append(plan)
        bar.total = plan.total_bytes  # type: ignore[attr-defined]
        if args.dry_run:
            print(plan.summary())  # type: ignore[attr-defined]

    with logging_redirect_tqdm(), bar:
        report = merge(
            base=args.base, adapters=args.adapter, out=args.out, adapter_name=args.adapter_name,
            device=args.device, workers=workers, max_shard_size=args.max_shard_size,
            max_memory=args.max_memory or DEFAULT_MAX_MEMORY, dry_run=args.dry_run, overwrite=args.overwrite,
            allow_nonfinite=args.allow_nonfinite, on_progress=bar.update, on_plan=on_plan, resume=args.resume,
        )
    if not args.quiet or args.dry_run:
        print(report.summary())
    return 0


def entrypoint() -> None:
    """Console-script entry point."""
    raise SystemExit(main())
