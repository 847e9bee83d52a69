"""Shared benchmark harness for fastode's bench/ scripts (small on purpose; reuse it).

What it gives you:

* ``pin_threads(n=1)``      -- set OMP_NUM_THREADS / MKL_NUM_THREADS (inherited by subprocesses) and
                               ``torch.set_num_threads(n)``.  Call it before timing anything.  Setting the
                               environment variables only affects the current process if it runs before
                               ``import torch``; ``run.py`` therefore sets them at the very top.
* ``time_alternating(fns, repeats)`` -- time several callables *interleaved*: every repeat runs each
                               callable once, in an order rotated by one position per repeat, so slow
                               drift in machine load hits all peers alike.  Returns medians of wall
                               time and of process CPU time (and all samples).  Compare peers only within one such call (same run, same load).
* ``metadata()``            -- machine (lscpu model, cores), versions (python, torch, fastode, torchdiffeq,
                               torchode, scipy, numpy), git commit (+ dirty flag), threads, load average.
* ``Timer``/``loadavg()``   -- wall clock helpers; ``loadavg()`` is ``os.getloadavg()`` (the machine is
                               shared: record the load next to every result).
* ``peak_rss_delta(fn)``    -- peak resident-set-size growth (bytes) while ``fn()`` runs, via Linux's
                               VmHWM reset (``/proc/self/clear_refs``); run it in a fresh subprocess.
* ``SavedTensorMeter``      -- peak bytes held by autograd's saved tensors (``saved_tensors_hooks``).
* ``write_json``, ``markdown_table``, ``write_text`` -- result writers.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# ----------------------------------------------------------------------------------------------- threads
def pin_threads(n: int = 1) -> None:
    """Pin intra-op threads to ``n`` (environment for subprocesses, torch for this process)."""
    for var in _THREAD_VARS:
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    try:  # may only be set once, before any inter-op work started
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass


# ----------------------------------------------------------------------------------------------- timing
def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (``os.getloadavg()``)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - non-Unix
        return [float("nan")] * 3


@dataclass
class Timing:
    """Samples (seconds) of one callable from ``time_alternating``."""

    samples: list[float] = field(default_factory=list)       # wall clock (perf_counter)
    cpu_samples: list[float] = field(default_factory=list)   # process CPU time (process_time)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def cpu_median(self) -> float:
        """Median process CPU time: less sensitive than wall time to other jobs on a shared machine
        (it still includes cache / memory-bandwidth contention)."""
        return statistics.median(self.cpu_samples) if self.cpu_samples else float("nan")

    @property
    def iqr(self) -> tuple[float, float]:
        if len(self.samples) < 2:
            return (self.median, self.median)
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return (q[0], q[2])

    def as_dict(self) -> dict:
        return {"median_s": self.median, "iqr_s": list(self.iqr), "cpu_median_s": self.cpu_median,
                "n": len(self.samples), "samples_s": self.samples}


def time_alternating(fns: Mapping[str, Callable[[], Any]], repeats: int = 5, *, warmup: int = 1,
                     min_repeats: int = 3, budget_s: float | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Median-of-repeats timing of several peers, interleaved.

    Each of ``warmup`` rounds calls every function once untimed.  Then each repeat ``r`` calls every
    function once, starting at position ``r % len(fns)`` (rotation), and records its wall time.  When
    ``budget_s`` is given, repeats stop early once that much time has been spent and at least
    ``min_repeats`` were done (slow configurations get fewer repeats, never fewer than ``min_repeats``).
    """
    names = list(fns)
    out = {name: Timing() for name in names}
    for _ in range(warmup):
        for name in names:
            fns[name]()
    start = clock()
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            c0, t0 = time.process_time(), clock()
            fns[name]()
            t1, c1 = clock(), time.process_time()
            out[name].samples.append(t1 - t0)
            out[name].cpu_samples.append(c1 - c0)
        if budget_s is not None and r + 1 >= min_repeats and clock() - start > budget_s:
            break
    return out


class Timer:
    """``with Timer() as t: ...`` then ``t.elapsed`` (seconds)."""

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self._t0
        return False


# ----------------------------------------------------------------------------------------------- memory
def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - non-glibc
        pass


def peak_rss_delta(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Return ``(peak RSS growth in bytes while fn() ran, fn's result)``.

    Linux only.  Freed heap memory is first returned to the OS (``malloc_trim``), the high-water mark
    is reset to the current RSS (``echo 5 > /proc/self/clear_refs``), ``fn`` runs, and the result is
    ``VmHWM - VmRSS(before)``.  This counts everything the process touched (tensors, autograd graph,
    allocator slack), so run each configuration in a *fresh subprocess* after a tiny warm-up that loads
    lazily initialised code.  Resolution is a page; noise is a few MiB, so size problems accordingly.
    """
    import gc

    gc.collect()
    _malloc_trim()
    before = _proc_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        reset = True
    except OSError:  # pragma: no cover - fall back to ru_maxrss (may under-count)
        reset = False
    if not reset:
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = fn()
    peak = _proc_status_kib("VmHWM") if reset else __import__("resource").getrusage(
        __import__("resource").RUSAGE_SELF).ru_maxrss
    return max(0, peak - before) * 1024, result


class SavedTensorMeter:
    """Peak bytes of tensors held for backward by autograd (``torch.autograd.graph.saved_tensors_hooks``).

    Storages are de-duplicated (a tensor saved by several nodes counts once) and released when the
    last node holding them is freed.  Only tensors that go through autograd's saved-tensor mechanism
    are seen (``ctx.save_for_backward`` included, ``ctx.attr = tensor`` not); use it next to
    ``peak_rss_delta``, not instead of it.

        meter = SavedTensorMeter()
        with meter:
            loss = model(x); loss.backward()
        meter.peak_bytes
    """

    def __init__(self):
        self.live: dict[int, list[int]] = {}
        self.current = 0
        self.peak_bytes = 0

    class _Handle:
        __slots__ = ("meter", "key", "tensor")

        def __init__(self, meter, key, tensor):
            self.meter, self.key, self.tensor = meter, key, tensor

        def __del__(self):
            self.meter._release(self.key)

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        entry = self.live.get(key)
        if entry is None:
            nbytes = storage.nbytes()
            self.live[key] = [nbytes, 1]
            self.current += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current)
        else:
            entry[1] += 1
        # detach(): a saved *output* would otherwise form a cycle tensor -> grad_fn -> handle -> tensor
        return SavedTensorMeter._Handle(self, key, tensor.detach())

    @staticmethod
    def _unpack(handle):
        return handle.tensor

    def _release(self, key):
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __enter__(self):
        import torch

        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# ----------------------------------------------------------------------------------------------- metadata
def _cmd(args: Sequence[str]) -> str | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10,
                              cwd=REPO_DIR).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception as exc:  # noqa: BLE001 - report, don't fail
        return f"not importable ({type(exc).__name__})"
    return getattr(mod, "__version__", "unknown")


def machine() -> dict:
    """CPU model and core count (from lscpu when available)."""
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    lscpu = _cmd(["lscpu"]) or ""
    for line in lscpu.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("Model name", "CPU(s)", "Core(s) per socket", "Socket(s)", "Thread(s) per core"):
            info[key.lower().replace("(s)", "s").replace(" ", "_")] = value
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return info


def metadata(**extra) -> dict:
    """Everything needed to interpret a result file: machine, versions, commit, threads, load."""
    import torch

    status = _cmd(["git", "status", "--porcelain", "--untracked-files=no"])
    meta = {
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _cmd(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(status),
        "machine": machine(),
        "versions": {"python": platform.python_version(),
                     **{m: _version(m) for m in ("torch", "fastode", "torchdiffeq", "torchode",
                                                 "scipy", "numpy")}},
        "threads": {"torch.get_num_threads": torch.get_num_threads(),
                    **{v: os.environ.get(v) for v in _THREAD_VARS}},
        "loadavg_1_5_15": loadavg(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    meta.update(extra)
    return meta


def metadata_markdown(meta: Mapping) -> str:
    """A short Markdown block describing ``metadata()``."""
    m, v = meta["machine"], meta["versions"]
    lines = [
        f"- machine: {m.get('model_name', '?')}, {m.get('cpus', m.get('cpu_count'))} CPUs"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f" ({m.get('platform')})",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- git commit: `{meta.get('git_commit')}`" + (" (with uncommitted changes)" if meta.get("git_dirty") else ""),
        f"- threads: torch {meta['threads']['torch.get_num_threads']}, "
        f"OMP_NUM_THREADS={meta['threads'].get('OMP_NUM_THREADS')}",
        f"- load average (1/5/15 min) at start: {meta.get('loadavg_1_5_15')}"
        + (f", at end: {meta['loadavg_end']}" if meta.get("loadavg_end") else ""),
        f"- date (UTC): {meta.get('timestamp_utc')}; command: `{meta.get('command')}`",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- writers
def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return _jsonable(obj.item())
        except (ValueError, RuntimeError):
            pass
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=1) + "\n")
    return path


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


def fmt(x: Any, digits: int = 3) -> str:
    """Compact number formatting for tables (``None``/NaN -> '-')."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "-" if math.isnan(x) else str(x)
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.{max(digits - 1, 1)}e}"
        return f"{x:.{digits}g}"
    return str(x)


def markdown_table(rows: Iterable[Mapping], columns: Sequence[str] | Mapping[str, str]) -> str:
    """Markdown table; ``columns`` is a list of keys or ``{key: header}``."""
    if not isinstance(columns, Mapping):
        columns = {c: c for c in columns}
    keys = list(columns)
    out = ["| " + " | ".join(columns[k] for k in keys) + " |",
           "|" + "|".join("---" for _ in keys) + "|"]
    for row in rows:
        out.append("| " + " | ".join(fmt(row.get(k)) for k in keys) + " |")
    return "\n".join(out)


def geomean(xs: Iterable[float]) -> float:
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


# ----------------------------------------------------------------------------------------------- peers
def fastode_odeint():
    """``(fastode.odeint, None)`` when usable, else ``(None, reason)`` -- bench scripts skip fastode rows
    (and say why in their output) instead of failing while the solver is under construction."""
    try:
        import fastode
        return fastode.odeint, None
    except Exception as exc:  # noqa: BLE001
        return None, f"fastode.odeint unavailable: {type(exc).__name__}: {exc}"
