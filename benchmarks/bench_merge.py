"""Benchmark streammerge against ``cp -r`` (the floor) and transformers+PEFT (the baseline).

    python benchmarks/bench_merge.py --case llama-1b --adapter all-linear --reps 3
    python benchmarks/bench_merge.py --case 70b-slice-4 --adapter all-linear --peft-reps 0
    python benchmarks/bench_merge.py --base B --adapter-dir A --tools cp,streammerge --sm-args "--workers 2"

Protocol (see benchmarks/README.md and design.md §7):

* the case is synthesised with synth.py under ``--root`` if missing;
* the base is read once before anything (warm page cache; we cannot drop caches), and re-read before every
  timed command (cheap while cached; it matters for the 70B slices, whose output evicts the base);
* every tool runs once untimed (warm-up), then the tools alternate for ``--reps`` rounds, in the order
  ``cp, streammerge, peft`` on even rounds and reversed on odd ones (A B A B, no tool always first);
* before every command the previous outputs are deleted and ``sync`` is called (untimed);
* each command is a child process: wall seconds from ``perf_counter`` around ``Popen``..``os.wait4``, and
  the command's OWN peak RSS from GNU time's ``%M`` (run_child says why not our own wait4); a sampler
  thread also reads ``/proc/PID/status`` every 20 ms to split the peak into anonymous memory (RssAnon)
  and mapped file pages (RssFile);
* after the command the bench fsyncs every output file and times that too: ``durable_s = wall_s + flush_s``.
  cp and PEFT do not fsync, a tool that does pays for it inside ``wall_s``; ``durable_s`` puts all tools on
  the same footing (data on disk) and is the primary figure. ``wall_s`` is reported too;
* ratios to cp are medians of per-round ratios (tool_i / cp_i) with min and max.

Prints a markdown table and one JSON line (also appended to ``--results`` if given).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import synth  # noqa: E402

TOOLS = ("cp", "sm-before", "streammerge", "peft")


# ----------------------------------------------------------------------------------------------- children
@dataclass
class Run:
    tool: str
    round: int  # -1 for the warm-up
    rc: int
    wall_s: float
    flush_s: float
    peak_rss_mb: float  # ru_maxrss of this child (and its waited-for descendants)
    peak_anon_mb: float  # sampled max of RssAnon (0 if the child ran too briefly to sample)
    peak_file_mb: float  # sampled max of RssFile (mmapped / read file pages counted in RSS)
    out_bytes: int
    cpu_s: float  # user+sys of the command
    other_cpu_s: float  # CPU used by everything else meanwhile (other jobs, kernel writeback)
    load1: float  # 1-minute load average just before the command
    noisy: bool  # other_cpu_s / wall_s above --noisy-cores: someone else was using the CPUs
    log: str
    extra: dict = field(default_factory=dict)

    @property
    def durable_s(self) -> float:
        return self.wall_s + self.flush_s


class _Sampler(threading.Thread):
    """Polls /proc/PID/status of the measured process for RssAnon / RssFile / VmHWM while it runs.

    With a /usr/bin/time launcher the measured process is time's child, found via /proc/.../children.
    """

    def __init__(self, pid: int, via_launcher: bool, period: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.via_launcher, self.period = pid, via_launcher, period
        self.anon_kb = self.file_kb = self.hwm_kb = 0
        self._halt = threading.Event()

    def _find_target(self) -> int | None:
        if not self.via_launcher:
            return self.pid
        try:
            kids = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            return None
        return int(kids[0]) if kids else None

    def run(self) -> None:
        target = None
        while not self._halt.is_set():
            target = target or self._find_target()
            if target is not None:
                try:
                    with open(f"/proc/{target}/status") as f:
                        for line in f:
                            key, _, rest = line.partition(":")
                            if key == "RssAnon":
                                self.anon_kb = max(self.anon_kb, int(rest.split()[0]))
                            elif key == "RssFile":
                                self.file_kb = max(self.file_kb, int(rest.split()[0]))
                            elif key == "VmHWM":
                                self.hwm_kb = max(self.hwm_kb, int(rest.split()[0]))
                except (OSError, ValueError, IndexError):
                    if not self.via_launcher:
                        return
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()


GNU_TIME = "/usr/bin/time"


def run_child(cmd: list[str], *, env: dict | None, log_path: Path, cwd: str | None = None) -> dict:
    """Run cmd; return rc, wall_s, peak_rss_mb, peak_anon_mb, peak_file_mb, cpu_s (its user+sys) and
    other_cpu_s (CPU seconds the rest of the machine, kernel writeback included, used meanwhile).

    Peak RSS: ``os.wait4`` on a child forked from this (big, torch-importing) Python process is NOT the
    child's own peak: Linux keeps the RSS high-water mark across exec, and with vfork/posix_spawn the
    pre-exec mm is the parent's, so ``ru_maxrss`` reads at least the parent's RSS (we saw 236 MB for
    ``cp`` of a 300 kB dir). So the command is launched through GNU time, a tiny process whose own
    wait4 of its child is exact, and we read its ``%M``. Without /usr/bin/time we fall back to our
    wait4 (an upper bound) and the sampled VmHWM.
    """
    use_time = os.access(GNU_TIME, os.X_OK)
    rusage_file = log_path.with_suffix(".rusage")
    full = [GNU_TIME, "-f", "%M %U %S %x", "-o", str(rusage_file), *cmd] if use_time else cmd
    busy0 = _busy_cpu_s()
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        sampler = _Sampler(proc.pid, via_launcher=use_time)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C / SIGTERM of the bench: take the measured command down with us
            _kill_tree(proc.pid)
            sampler.stop()
            raise
        wall = time.perf_counter() - t0
        sampler.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    busy = _busy_cpu_s() - busy0
    rc = proc.returncode
    peak_kb = usage.ru_maxrss  # Linux: KiB
    cpu = usage.ru_utime + usage.ru_stime
    if use_time:
        try:
            fields = rusage_file.read_text().split()
            peak_kb, cpu = int(fields[-4]), float(fields[-3]) + float(fields[-2])
        except (OSError, ValueError, IndexError):
            peak_kb = max(peak_kb, sampler.hwm_kb)  # time itself failed (e.g. command not found)
    return {"rc": rc, "wall_s": wall, "peak_rss_mb": peak_kb / 1024, "peak_anon_mb": sampler.anon_kb / 1024,
            "peak_file_mb": sampler.file_kb / 1024, "cpu_s": cpu, "other_cpu_s": max(0.0, busy - cpu)}


def _kill_tree(pid: int) -> None:
    """SIGTERM pid's children (the command under /usr/bin/time), then pid; reap it."""
    import signal

    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        kids = []
    for k in [*kids, pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(k, signal.SIGTERM)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _busy_cpu_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    busy = sum(v[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / os.sysconf("SC_CLK_TCK")


def fsync_tree(root: Path) -> tuple[float, int]:
    """fsync every file under root (and the directories); returns (seconds, total bytes)."""
    t0 = time.perf_counter()
    total = 0
    if not root.exists():
        return 0.0, 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0, total


def read_tree(root: Path, bufsize: int = 16 << 20) -> tuple[float, int]:
    """Read every file once (page-cache warm-up)."""
    t0 = time.perf_counter()
    total = 0
    buf = bytearray(bufsize)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
    return time.perf_counter() - t0, total


def wait_quiet(max_wait: float, busy_limit: float = 0.25) -> float:
    """Wait (up to max_wait s) until the machine is idle: < busy_limit CPU-seconds used over 1 s.

    Other jobs on the 2 shared cores (a test suite, a build) inflate CPU-bound timings; this keeps the
    runs we time away from them when they are transient. Returns the seconds waited.
    """
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        b0 = _busy_cpu_s()
        time.sleep(1.0)
        if _busy_cpu_s() - b0 < busy_limit:
            break
    return time.perf_counter() - t0


def remove(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    os.sync()


# ----------------------------------------------------------------------------------------------- tools
def tool_cmd(tool: str, base: Path, adapter: Path, out: Path, args: argparse.Namespace) -> tuple[list[str], dict]:
    env = dict(os.environ)
    if tool == "cp":
        return ["cp", "-r", str(base), str(out)], env
    if tool in ("streammerge", "sm-before"):
        path = args.sm_pythonpath if tool == "streammerge" else args.sm_before_pythonpath
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "streammerge", "merge", "--base", str(base), "--adapter", str(adapter),
               "--out", str(out), *shlex.split(args.sm_args)]
        return cmd, env
    if tool == "peft":
        return [sys.executable, str(HERE / "peft_merge.py"), str(base), str(adapter), str(out)], env
    raise ValueError(tool)


def run_tool(tool: str, rnd: int, base: Path, adapter: Path, args: argparse.Namespace) -> Run:
    out = Path(args.out_root) / f"out-{tool}"
    remove(out)
    if args.rewarm:
        read_tree(base)
    waited = wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
    cmd, env = tool_cmd(tool, base, adapter, out, args)
    log_path = Path(args.out_root) / f"{tool}-round{rnd}.log"
    # cwd = out_root: ``python -m`` puts the cwd first on sys.path, so running from a checkout would
    # shadow --sm-pythonpath with that checkout's streammerge.
    load1 = os.getloadavg()[0]
    res = run_child(cmd, env=env, log_path=log_path, cwd=args.out_root)
    rc, wall, rss, anon, filemb = (res[k] for k in ("rc", "wall_s", "peak_rss_mb", "peak_anon_mb", "peak_file_mb"))
    flush, nbytes = fsync_tree(out)
    log = log_path.read_text(errors="replace")
    extra: dict = {"waited_for_quiet_s": round(waited, 1)}
    if tool == "peft" and rc == 0:
        for line in reversed(log.splitlines()):
            if line.startswith("{"):
                extra |= json.loads(line)
                break
    # /proc/stat counts in 10 ms ticks: ignore less than 0.1 CPU-s of other load, whatever the wall time.
    noisy = res["other_cpu_s"] > max(args.noisy_cores * wall, 0.1)
    run = Run(tool, rnd, rc, wall, flush, rss, anon, filemb, nbytes, res["cpu_s"], res["other_cpu_s"], load1,
              noisy, log[-4000:], extra)
    if rc == 0 and args.verify and tool != "cp" and rnd == -1:
        run.extra["verify"] = verify_output(base, adapter, out)
    if not args.keep_outputs:
        remove(out)
    tag = "warm-up" if rnd < 0 else f"round {rnd}"
    print(f"[{tag}] {tool:12s} rc={rc} wall={wall:7.2f}s flush={flush:6.2f}s rss={rss:8.0f}MB "
          f"(anon {anon:.0f}, file {filemb:.0f}) cpu={res['cpu_s']:.1f}s other_cpu={res['other_cpu_s']:.1f}s "
          f"load1={load1:.1f} out={nbytes / 1e9:.2f}GB{' NOISY' if noisy else ''}", file=sys.stderr, flush=True)
    if rc != 0:
        print(f"  {tool} failed: {shlex.join(cmd)}\n  log tail:\n{log[-2000:]}", file=sys.stderr)
    return run


def verify_output(base: Path, adapter: Path, out: Path, samples: int = 4) -> dict:
    """Cheap sanity check: same tensor names/shapes/dtypes; a few merged tensors match W + s*B@A (fp32, one
    rounding) within 1 bf16 ulp; a few untouched tensors are bit-identical."""
    import torch
    from safetensors import safe_open

    def open_index(d: Path) -> dict[str, str]:
        idx = d / "model.safetensors.index.json"
        if idx.exists():
            return json.loads(idx.read_text())["weight_map"]
        with safe_open(d / "model.safetensors", "pt") as f:  # single-file checkpoint
            return dict.fromkeys(f.keys(), "model.safetensors")

    bmap, omap = open_index(base), open_index(out)
    problems = []
    if set(bmap) != set(omap):
        problems.append(f"tensor names differ: {sorted(set(bmap) ^ set(omap))[:5]}")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    with safe_open(adapter / "adapter_model.safetensors", "pt") as fa:
        akeys = set(fa.keys())
        targets = sorted(k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
                         for k in akeys if k.endswith(".lora_A.weight"))
        plain = sorted(n for n in bmap if n not in targets and n.endswith("_proj.weight"))
        step = max(1, len(targets) // samples)
        picks = targets[::step][:samples] + plain[: max(1, samples // 2)]
        max_ulps = 0.0
        for name in picks:
            with safe_open(base / bmap[name], "pt") as fb, safe_open(out / omap[name], "pt") as fo:
                w, m = fb.get_tensor(name), fo.get_tensor(name)
            if m.dtype != w.dtype or m.shape != w.shape:
                problems.append(f"{name}: {m.dtype}{tuple(m.shape)} != base {w.dtype}{tuple(w.shape)}")
                continue
            if name in targets:
                key = "base_model.model." + name.removesuffix(".weight")
                a, b = fa.get_tensor(f"{key}.lora_A.weight"), fa.get_tensor(f"{key}.lora_B.weight")
                ref = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
                if torch.equal(m, w):
                    problems.append(f"{name}: not merged (identical to base)")
                ulp = torch.finfo(w.dtype).eps
                err = ((m.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-30)).max().item()
                max_ulps = max(max_ulps, err / ulp)
                if err > ulp:
                    problems.append(f"{name}: max rel err {err:.3g} > 1 ulp")
            elif not torch.equal(m, w):
                problems.append(f"{name}: not a target but changed")
    return {"checked": len(picks), "max_rel_err_ulps": round(max_ulps, 3), "problems": problems}


# ----------------------------------------------------------------------------------------------- report
def machine_info() -> dict:
    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "nproc": sh("nproc"),
        "cpu": cpu,
        "mem_total_gb": sh("free -g | awk '/Mem:/{print $2}'"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def snapshot(repo: str, rev: str, root: Path) -> Path:
    """``git archive`` of streammerge at ``rev`` into ROOT/sm-<sha>/ (read-only use; repo untouched).

    Benchmarking a pinned commit, not a working tree someone is editing, keeps the figures attributable.
    """
    sha = subprocess.run(["git", "-C", repo, "rev-parse", "--short=9", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    dest = root / f"sm-{sha}"
    if not (dest / "streammerge" / "__init__.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", repo, "archive", sha, "streammerge"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        subject = subprocess.run(["git", "-C", repo, "log", "-1", "--format=%h %s", sha], capture_output=True,
                                 text=True, check=True).stdout.strip()
        (dest / "REV").write_text(subject + "\n")
    return dest


def sm_version(path: str) -> str:
    if not path:
        return ""
    rev = Path(path) / "REV"
    if rev.exists():
        return rev.read_text().strip()
    try:
        return subprocess.run(["git", "-C", path, "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def summarize(runs: list[Run], total_bytes: int, metric: str, drop_noisy: bool = True) -> dict:
    """Per-tool stats over the timed rounds.

    With drop_noisy, a tool's noisy runs are left out when it has at least one clean run (otherwise all
    its runs are kept and ``noisy_included`` says so); ratios use only rounds where both runs were kept.
    """
    timed = [r for r in runs if r.round >= 0]
    out: dict[str, dict] = {}
    by_tool: dict[str, dict[int, Run]] = {}
    for tool in dict.fromkeys(r.tool for r in timed):
        mine = [r for r in timed if r.tool == tool]
        clean = [r for r in mine if not r.noisy]
        keep = clean if (drop_noisy and clean) else mine
        by_tool[tool] = {r.round: r for r in keep}
        out[tool] = {"rounds_used": sorted(r.round for r in keep),
                     "noisy_runs_dropped": len(mine) - len(keep),
                     "noisy_included": sum(r.noisy for r in keep)}
    cp = by_tool.get("cp", {})
    for tool, rr in by_tool.items():
        ok = [r for r in rr.values() if r.rc == 0]
        if not ok:
            out[tool] |= {"reps": 0, "failed": len(rr)}
            continue
        t = [getattr(r, metric) for r in ok]
        walls = [r.wall_s for r in ok]
        med = statistics.median(t)
        s = out[tool] | {
            "reps": len(ok),
            "failed": len(rr) - len(ok),
            f"{metric}_median": round(med, 3),
            f"{metric}_min": round(min(t), 3),
            f"{metric}_max": round(max(t), 3),
            "wall_s_median": round(statistics.median(walls), 3),
            "flush_s_median": round(statistics.median(r.flush_s for r in ok), 3),
            "peak_rss_mb_max": round(max(r.peak_rss_mb for r in ok), 1),
            "peak_rss_mb_median": round(statistics.median(r.peak_rss_mb for r in ok), 1),
            "peak_anon_mb_max": round(max(r.peak_anon_mb for r in ok), 1),
            "peak_file_mb_max": round(max(r.peak_file_mb for r in ok), 1),
            "gb_per_s": round(total_bytes / 1e9 / med, 3),
            "cpu_s_median": round(statistics.median(r.cpu_s for r in ok), 2),
            "other_cpu_s_median": round(statistics.median(r.other_cpu_s for r in ok), 2),
            "other_cpu_s_max": round(max(r.other_cpu_s for r in ok), 2),
            "all": [round(x, 3) for x in t],
        }
        pairs = [getattr(r, metric) / getattr(cp[i], metric) for i, r in rr.items()
                 if r.rc == 0 and i in cp and cp[i].rc == 0]
        if pairs:
            s["ratio_cp_median"] = round(statistics.median(pairs), 3)
            s["ratio_cp_min"] = round(min(pairs), 3)
            s["ratio_cp_max"] = round(max(pairs), 3)
        wpairs = [r.wall_s / cp[i].wall_s for i, r in rr.items() if r.rc == 0 and i in cp and cp[i].rc == 0]
        if wpairs:
            s["wall_ratio_cp_median"] = round(statistics.median(wpairs), 3)
        extras = [r.extra for r in ok if r.extra and "load_s" in r.extra]
        if extras:
            stages = [k for k, v in extras[0].items() if isinstance(v, (int, float)) and k != "waited_for_quiet_s"]
            s["stages_median"] = {k: round(statistics.median(e[k] for e in extras), 2) for k in stages}
        out[tool] = s
    sm, bf = by_tool.get("streammerge", {}), by_tool.get("sm-before", {})
    if out.get("streammerge", {}).get("reps") and out.get("sm-before", {}).get("reps"):
        pb = [getattr(bf[i], metric) / getattr(r, metric) for i, r in sm.items()
              if r.rc == 0 and i in bf and bf[i].rc == 0]
        if pb:
            out["streammerge"]["speedup_vs_before_pairs"] = [round(min(pb), 2), round(statistics.median(pb), 2),
                                                             round(max(pb), 2)]
    pf = by_tool.get("peft", {})
    if "streammerge" in out and "peft" in out and out["streammerge"].get("reps") and out["peft"].get("reps"):
        out["streammerge"]["speedup_vs_peft_of_medians"] = round(
            out["peft"][f"{metric}_median"] / out["streammerge"][f"{metric}_median"], 2)
        pp = [getattr(pf[i], metric) / getattr(r, metric) for i, r in sm.items()
              if r.rc == 0 and i in pf and pf[i].rc == 0]
        if pp:
            out["streammerge"]["speedup_vs_peft_pairs"] = [round(min(pp), 2), round(statistics.median(pp), 2),
                                                           round(max(pp), 2)]
    return out


def markdown(summary: dict, metric: str, total_bytes: int) -> str:
    head = (f"| tool | reps | {metric} median | min–max | wall_s median | flush_s | GB/s | ratio to cp "
            f"(median [min–max] of pairs) | peak RSS MB | of which anon / file MB | CPU s | other CPU s (max) |")
    lines = [head, "|" + "---|" * 12]
    for tool in TOOLS:
        s = summary.get(tool)
        if not s:
            continue
        if not s.get("reps"):
            lines.append(f"| {tool} | 0 ({s.get('failed')} failed) | | | | | | | | | | |")
            continue
        ratio = (f"{s['ratio_cp_median']:.2f}x [{s['ratio_cp_min']:.2f}–{s['ratio_cp_max']:.2f}]"
                 if "ratio_cp_median" in s else "–")
        lines.append(
            f"| {tool} | {s['reps']} | {s[f'{metric}_median']:.2f} | {s[f'{metric}_min']:.2f}–"
            f"{s[f'{metric}_max']:.2f} | {s['wall_s_median']:.2f} | {s['flush_s_median']:.2f} | "
            f"{s['gb_per_s']:.2f} | {ratio} | {s['peak_rss_mb_max']:.0f} | "
            f"{s['peak_anon_mb_max']:.0f} / {s['peak_file_mb_max']:.0f} | {s['cpu_s_median']:.1f} | "
            f"{s['other_cpu_s_median']:.1f} ({s['other_cpu_s_max']:.1f}) |")
    sm = summary.get("streammerge", {})
    if "speedup_vs_peft_of_medians" in sm:
        lines.append("")
        lines.append(f"streammerge vs PEFT: {sm['speedup_vs_peft_of_medians']:.2f}x faster (ratio of medians)"
                     + (f"; per-pair min/median/max {sm['speedup_vs_peft_pairs']}"
                        if "speedup_vs_peft_pairs" in sm else ""))
    if "speedup_vs_before_pairs" in sm:
        lines.append(f"streammerge vs sm-before: per-pair speed-up min/median/max {sm['speedup_vs_before_pairs']}")
    lines.append(f"checkpoint bytes (index total_size): {total_bytes:,d} ({total_bytes / 1e9:.3f} GB)")
    used = "; ".join(f"{t} rounds {summary[t]['rounds_used']} (noisy dropped {summary[t]['noisy_runs_dropped']}, "
                     f"noisy kept {summary[t]['noisy_included']})" for t in TOOLS if t in summary)
    lines.append(f"runs used: {used}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(synth.SHAPES), help="synthetic case (made under --root if missing)")
    ap.add_argument("--adapter", default="all-linear", choices=sorted(synth.ADAPTER_TARGETS))
    ap.add_argument("--root", default="/tmp/smbench")
    ap.add_argument("--base", help="explicit base dir (instead of --case)")
    ap.add_argument("--adapter-dir", help="explicit adapter dir (with --base)")
    ap.add_argument("--out-root", default=None,
                    help="where outputs and logs go (default ROOT/out/run-PID: concurrent benches must not share it)")
    ap.add_argument("--tools", default="cp,streammerge,peft")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peft-reps", type=int, default=None,
                    help="timed PEFT rounds (default --reps; 0 = skip PEFT; PEFT runs in the first N rounds)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each tool")
    ap.add_argument("--no-peft-warmup", action="store_true", help="skip only PEFT's warm-up (slow on big cases)")
    ap.add_argument("--no-rewarm", dest="rewarm", action="store_false",
                    help="do not re-read the base before each command")
    ap.add_argument("--quiet-wait", type=float, default=90.0,
                    help="before each command wait up to this many seconds for an idle CPU (0 = never)")
    ap.add_argument("--noisy-cores", type=float, default=0.5,
                    help="a run is noisy when other processes used more than this many cores on average")
    ap.add_argument("--retry-noisy", type=int, default=3, help="extra rounds allowed to replace noisy ones")
    ap.add_argument("--keep-noisy", action="store_true", help="count noisy rounds in the summary too")
    ap.add_argument("--sm-args", default="", help='extra streammerge flags, e.g. "--workers 2"')
    ap.add_argument("--sm-pythonpath", default=str(REPO),
                    help="PYTHONPATH for the streammerge child (default: this checkout; e.g. /work/main)")
    ap.add_argument("--sm-rev", help="benchmark this commit of --sm-repo (git archive snapshot under ROOT); "
                    "overrides --sm-pythonpath")
    ap.add_argument("--sm-repo", default="/work/main")
    ap.add_argument("--sm-before-rev", help="also run this commit of --sm-repo as tool 'sm-before' in the same "
                    "alternating rounds (a before/after comparison; add sm-before to --tools)")
    ap.add_argument("--metric", default="durable_s", choices=["durable_s", "wall_s"],
                    help="time used for medians and ratios (default: wall + fsync of outputs)")
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip checking the warm-up outputs of streammerge/PEFT against W + s*B@A")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--results", help="append the JSON line to this file")
    ap.add_argument("--label", default="", help="free text stored in the JSON line (a filter with --resummarize)")
    ap.add_argument("--resummarize", metavar="RESULTS", help="re-print tables from a --results file and exit")
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv[:-1]):  # let `--sm-args "--workers 2"` through (argparse sees an option)
        if a == "--sm-args":
            argv[i : i + 2] = [f"--sm-args={argv[i + 1]}"]
            break
    args = ap.parse_args(argv)
    if not args.case and not (args.base and args.adapter_dir) and not args.resummarize:
        ap.error("give --case, or --base and --adapter-dir")
    if args.out_root is None:
        args.out_root = str(Path(args.root) / "out" / f"run-{os.getpid()}")
    if args.sm_rev:
        args.sm_pythonpath = str(snapshot(args.sm_repo, args.sm_rev, Path(args.root)))
    args.sm_before_pythonpath = (str(snapshot(args.sm_repo, args.sm_before_rev, Path(args.root)))
                                 if args.sm_before_rev else "")
    if "sm-before" in args.tools and not args.sm_before_rev:
        ap.error("tool sm-before needs --sm-before-rev")
    return args


def resummarize(path: str, select: str | None, keep_noisy: bool) -> int:
    """Print the tables of stored JSON lines again (optionally those whose label contains ``select``)."""
    fields = {f.name for f in Run.__dataclass_fields__.values()}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if select and select not in rec.get("label", ""):
            continue
        # Older records lack the CPU/noise fields: they count as clean with unknown CPU.
        dflt = {"cpu_s": 0.0, "other_cpu_s": 0.0, "load1": 0.0, "noisy": False, "log": ""}
        runs = [Run(**(dflt | {k: v for k, v in r.items() if k in fields})) for r in rec["runs"]]
        if not runs:
            continue
        summary = summarize(runs, rec["total_bytes"], rec["metric"], drop_noisy=not keep_noisy)
        print(f"### {rec['case']} + {rec['adapter']} ({rec['date']}, {rec.get('streammerge_rev', '')}, "
              f"label {rec.get('label', '')!r}, sm_args {rec.get('sm_args', '')!r})\n")
        print(markdown(summary, rec["metric"], rec["total_bytes"]))
        print()
    return 0


def run_rounds(tools: list[str], base: Path, adapter: Path, args: argparse.Namespace, peft_reps: int) -> list[Run]:
    """Warm-up runs, then alternating rounds until ``args.reps`` clean ones (or the retry allowance is spent)."""
    runs: list[Run] = []
    if not args.no_warmup:
        for tool in tools:
            if tool == "peft" and args.no_peft_warmup:
                continue
            runs.append(run_tool(tool, -1, base, adapter, args))
    clean = peft_done = rnd = 0
    while clean < args.reps and rnd < args.reps + args.retry_noisy:
        order = tools if rnd % 2 == 0 else list(reversed(tools))
        this = [run_tool(t, rnd, base, adapter, args) for t in order if t != "peft" or peft_done < peft_reps]
        runs += this
        peft_done += any(r.tool == "peft" for r in this)
        # PEFT runs are too long to ever be quiet here; they are not redone (their noise is reported).
        if not any(r.noisy for r in this if r.tool != "peft"):
            clean += 1
        elif rnd + 1 < args.reps + args.retry_noisy:
            print(f"[round {rnd}] noisy (other CPU load > {args.noisy_cores} cores): one more round",
                  file=sys.stderr)
        rnd += 1
    return runs


def _sigterm_to_exit(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGTERM, _sigterm_to_exit)
    args = parse_args(argv)
    if args.resummarize:
        return resummarize(args.resummarize, args.label or None, args.keep_noisy)
    if args.case:
        paths = synth.make_case(args.case, args.root)
        base, adapter = paths["base"], paths[args.adapter]
    else:
        base, adapter = Path(args.base), Path(args.adapter_dir)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    peft_reps = args.reps if args.peft_reps is None else args.peft_reps
    if peft_reps == 0 and "peft" in tools:
        tools.remove("peft")
    unknown = set(tools) - set(TOOLS)
    if unknown:
        raise SystemExit(f"unknown tools {unknown}; choose from {TOOLS}")
    Path(args.out_root).mkdir(parents=True, exist_ok=True)
    total_bytes = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"]

    info = machine_info()
    print(f"machine: {info}", file=sys.stderr)
    secs, nbytes = read_tree(base)
    print(f"warm-up read of base: {nbytes / 1e9:.2f} GB in {secs:.1f}s", file=sys.stderr)

    runs = run_rounds(tools, base, adapter, args, peft_reps)

    summary = summarize(runs, total_bytes, args.metric, drop_noisy=not args.keep_noisy)
    verify = {r.tool: r.extra["verify"] for r in runs if "verify" in r.extra}
    record = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "label": args.label,
        "case": args.case,
        "adapter": args.adapter if args.case else str(adapter),
        "base": str(base),
        "out_root": args.out_root,
        "total_bytes": total_bytes,
        "metric": args.metric,
        "reps": args.reps,
        "sm_args": args.sm_args,
        "streammerge_rev": sm_version(args.sm_pythonpath),
        "sm_before_rev": sm_version(args.sm_before_pythonpath),
        "machine": info,
        "cache": "warm page cache (base re-read before each command); outputs deleted + sync between runs",
        "verify": verify,
        "summary": summary,
        "runs": [{k: v for k, v in asdict(r).items() if k != "log"} | {"durable_s": round(r.durable_s, 3)}
                 for r in runs],
        "argv": sys.argv,
    }
    print()
    print(f"### {args.case or base} + {args.adapter if args.case else adapter} "
          f"({record['date']}, metric {args.metric})")
    print()
    print(markdown(summary, args.metric, total_bytes))
    if verify:
        print(f"verify (warm-up outputs): {json.dumps(verify)}")
    print()
    line = json.dumps(record)
    print(line)
    if args.results:
        with open(args.results, "a") as f:
            f.write(line + "\n")
    failed = [r for r in runs if r.rc != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
