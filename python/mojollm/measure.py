"""Measurement hygiene shared by `mojollm compare` and the bench/ scripts.

Rules every number we report follows:
  * clocks are read only after `backend.synchronize()` (device work is asynchronous on GPUs/TPUs);
  * warm-up runs (kernel builds, JIT traces, caches) are excluded; we report the median of repeats;
  * peak memory is reset before the measured region: host RSS high-water mark (Linux VmHWM, reset
    through /proc/self/clear_refs) on the CPU, torch.cuda.max_memory_allocated on cuda/rocm,
    the JAX device's peak_bytes_in_use where the platform reports it;
  * energy comes from the hardware's own counter (NVML total energy, else NVML / nvidia-smi power
    samples integrated over time, else Intel RAPL); where none reports, we report None, never a guess;
  * the roofline a run is compared against is a bandwidth *measured on the same device in the
    same process*, not a datasheet number: `backend.memory_bandwidth_gbs()`, the one probe
    (device_bandwidth below reads it).
"""

from __future__ import annotations

import datetime as _dt
import functools
import inspect
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

# ---------------------------------------------------------------------------------------------
# clocks and repeats


def sync_clock(backend: Any = None) -> float:
    """perf_counter() read after the backend's queued work has finished."""
    if backend is not None:
        backend.synchronize()
    return time.perf_counter()


def percentile(values, q: float) -> float | None:
    """q-th percentile (0..100, linear interpolation) of `values`; None when empty."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class Timing:
    """Seconds per run of the measured repeats (warm-up runs are not in `samples`)."""

    samples: list[float]
    warmup: int

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def best(self) -> float:
        return float(min(self.samples))

    def as_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.best, "repeats": len(self.samples), "warmup": self.warmup}


def time_repeats(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, backend: Any = None) -> Timing:
    """Run fn `warmup` times untimed, then `repeats` times, each timed between synchronized clocks."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = sync_clock(backend)
        fn()
        samples.append(sync_clock(backend) - t0)
    return Timing(samples, warmup)


# ---------------------------------------------------------------------------------------------
# peak memory


def _host_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(kb) * (1 if sys.platform == "darwin" else 1024)
    except Exception:
        return None


def _reset_host_hwm() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


class PeakMemory:
    """Peak memory of the region inside `with PeakMemory(backend_name) as pm:`; read pm.result().

    kind: "cuda_max_allocated" (torch allocator peak on the current GPU), "jax_peak_bytes"
    (JAX device stats), "host_rss_hwm" (process RSS high-water mark; "host_rss_hwm_process" when
    the mark could not be reset and therefore covers the whole process lifetime)."""

    def __init__(self, backend_name: str):
        self.backend_name = backend_name
        self.kind: str | None = None
        self.peak_bytes: int | None = None
        self.baseline_bytes: int | None = None  # in use when the region began
        self._jax_device = None

    def __enter__(self):
        if self.backend_name in ("cuda", "rocm"):
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    self.kind = "cuda_max_allocated"
                    self.baseline_bytes = int(torch.cuda.memory_allocated())
                    return self
            except Exception:
                pass
        if self.backend_name == "tpu":
            try:
                import jax

                dev = jax.devices()[0]
                stats = dev.memory_stats() if dev.platform != "cpu" else None
                if stats and "peak_bytes_in_use" in stats:  # JAX cannot reset it: peak since start
                    self._jax_device = dev
                    self.kind = "jax_peak_bytes"
                    self.baseline_bytes = int(stats.get("bytes_in_use", 0))
                    return self
            except Exception:
                pass
        self.kind = "host_rss_hwm" if _reset_host_hwm() else "host_rss_hwm_process"
        self.baseline_bytes = host_rss_bytes()
        return self

    def __exit__(self, *exc):
        try:
            if self.kind == "cuda_max_allocated":
                import torch

                torch.cuda.synchronize()
                self.peak_bytes = int(torch.cuda.max_memory_allocated())
            elif self.kind == "jax_peak_bytes":
                self.peak_bytes = int(self._jax_device.memory_stats()["peak_bytes_in_use"])
            else:
                self.peak_bytes = _host_hwm_bytes()
        except Exception:
            self.peak_bytes = None
        return False

    def result(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "kind": self.kind, "baseline_bytes": self.baseline_bytes}


# ---------------------------------------------------------------------------------------------
# memory bandwidth (the roofline's denominator)


def device_bandwidth(backend: Any) -> tuple[float | None, str]:
    """(GB/s, how) of the device `backend` computes on, from the one probe every roofline uses:
    `backend.memory_bandwidth_gbs()`, whose docstring's first line says how it measures. A failed
    measurement leaves the roofline blank (None), never the run dead."""
    probe = getattr(backend, "memory_bandwidth_gbs", None)
    try:
        gbs = probe() if probe is not None else None
    except Exception as e:
        return None, f"measurement failed: {type(e).__name__}: {e}"
    if not gbs:
        return None, "no bandwidth measurement for this backend"
    how = (inspect.getdoc(probe) or f"{backend.name}.memory_bandwidth_gbs()").splitlines()[0].rstrip(".")
    return float(gbs), how


# ---------------------------------------------------------------------------------------------
# roofline arithmetic


def decode_bytes_per_token(weight_bytes: int, kv_bytes_per_token: float, prompt_len: int,
                           output_len: int, batch: int) -> float:
    """Bytes a memory-bound decode must read per generated token, averaged over the decode steps.

    A decode step of `batch` sequences reads every weight once (shared by the batch) and, for each
    sequence, the KV of all its cached positions. The token produced by prefill is not a decode
    step: steps j = 1..N-1 attend over prompt_len + j positions, on average prompt_len + N/2.
    """
    if batch < 1 or output_len < 2:
        raise ValueError("a decode roofline needs batch >= 1 and output_len >= 2")
    mean_context = prompt_len + output_len / 2
    return weight_bytes / batch + kv_bytes_per_token * mean_context


def roofline_fraction(decode_tokens_per_s: float | None, bytes_per_token: float,
                      bandwidth_gbs: float | None) -> dict:
    """Achieved bandwidth and its fraction of the measured device bandwidth."""
    if not decode_tokens_per_s or not bandwidth_gbs:
        return {"bytes_per_token": bytes_per_token, "achieved_gbs": None,
                "roofline_tokens_per_s": None if not bandwidth_gbs else bandwidth_gbs * 1e9 / bytes_per_token,
                "fraction": None}
    achieved = decode_tokens_per_s * bytes_per_token / 1e9
    return {"bytes_per_token": bytes_per_token, "achieved_gbs": achieved,
            "roofline_tokens_per_s": bandwidth_gbs * 1e9 / bytes_per_token,
            "fraction": achieved / bandwidth_gbs}


# ---------------------------------------------------------------------------------------------
# energy


@functools.lru_cache(maxsize=None)
def jax_platform() -> str | None:
    """'cpu' | 'gpu' | 'tpu' for JAX's first device (None without jax). Only called for the tpu backend."""
    try:
        import jax

        return jax.devices()[0].platform
    except Exception:
        return None


def _cuda_nvml_handle(pynvml):
    """The NVML handle of torch's current GPU (by UUID, so CUDA_VISIBLE_DEVICES is respected)."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
    except Exception:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        return pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)


class EnergyMeter:
    """Energy of the region inside `with EnergyMeter(backend_name) as em:` (joules or None).

    Sources, best first: NVML total-energy counter (Volta+), NVML power samples, `nvidia-smi`
    power samples (cuda); Intel RAPL package counter (cpu, where readable). Samples are taken every
    `interval_s` by a background thread and integrated with the trapezoid rule."""

    def __init__(self, backend_name: str, interval_s: float = 0.05):
        self.backend_name = backend_name
        self.interval_s = interval_s
        self.source: str | None = None
        self.joules: float | None = None
        self._read_power_w: Callable[[], float] | None = None
        self._read_energy_j: Callable[[], float] | None = None
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._e0 = 0.0
        self._smi: subprocess.Popen | None = None

    # -- source discovery --
    def _setup(self) -> None:
        if self.backend_name == "cuda" or (self.backend_name == "tpu" and jax_platform() == "gpu"):
            try:
                import pynvml

                pynvml.nvmlInit()
                handle = _cuda_nvml_handle(pynvml)
                try:
                    pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                    self._read_energy_j = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3
                    self.source = "nvml total energy counter"
                except Exception:
                    pynvml.nvmlDeviceGetPowerUsage(handle)
                    self._read_power_w = lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3
                    self.source = "nvml power samples"
                return
            except Exception:
                pass
            if self._start_nvidia_smi():
                return
        if self.backend_name == "cpu":
            rapl = "/sys/class/powercap/intel-rapl:0/energy_uj"
            try:
                with open(rapl) as f:
                    int(f.read())
                wrap = int(open("/sys/class/powercap/intel-rapl:0/max_energy_range_uj").read())

                def read_rapl(prev=[None, 0]):  # handles the counter wrapping around
                    with open(rapl) as f:
                        v = int(f.read())
                    if prev[0] is not None and v < prev[0]:
                        prev[1] += wrap
                    prev[0] = v
                    return (v + prev[1]) / 1e6

                self._read_energy_j = read_rapl
                self.source = "intel rapl package counter (whole socket)"
            except (OSError, ValueError):
                pass

    def _start_nvidia_smi(self) -> bool:
        import shutil

        exe = shutil.which("nvidia-smi")
        if not exe:
            return False
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        try:
            self._smi = subprocess.Popen(
                [exe, "-i", visible, "--query-gpu=power.draw", "--format=csv,noheader,nounits",
                 f"-lms={max(int(self.interval_s * 1000), 20)}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return False

        def reader():
            for line in self._smi.stdout:
                try:
                    self._samples.append((time.perf_counter(), float(line.strip())))
                except ValueError:
                    continue

        self._thread = threading.Thread(target=reader, daemon=True)
        self._thread.start()
        self.source = "nvidia-smi power samples"
        return True

    # -- region --
    def __enter__(self):
        self._setup()
        self._t0 = time.perf_counter()
        if self._read_energy_j is not None:
            self._e0 = self._read_energy_j()
        elif self._read_power_w is not None:
            def sampler():
                while not self._stop.is_set():
                    self._samples.append((time.perf_counter(), self._read_power_w()))
                    self._stop.wait(self.interval_s)

            self._thread = threading.Thread(target=sampler, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        t1 = time.perf_counter()
        try:
            if self._read_energy_j is not None:
                self.joules = self._read_energy_j() - self._e0
            elif self.source is not None:
                self._stop.set()
                if self._smi is not None:
                    self._smi.terminate()
                    self._smi.wait(timeout=5)
                if self._thread is not None:
                    self._thread.join(timeout=5)
                self.joules = _integrate_power(self._samples, self._t0, t1)
        except Exception:
            self.joules = None
        return False

    def result(self) -> dict:
        return {"joules": self.joules, "source": self.source}


def _integrate_power(samples: list[tuple[float, float]], t0: float, t1: float) -> float | None:
    """Trapezoid integral of power samples over [t0, t1], holding the edge samples flat."""
    pts = sorted(s for s in samples if t0 <= s[0] <= t1)
    if not pts:
        return None
    ts = [t0] + [t for t, _ in pts] + [t1]
    ws = [pts[0][1]] + [w for _, w in pts] + [pts[-1][1]]
    return float(np.trapezoid(ws, ts)) if hasattr(np, "trapezoid") else float(np.trapz(ws, ts))


# ---------------------------------------------------------------------------------------------
# environment


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment_info() -> dict:
    """Versions, machine and thread counts: what a reader needs to reproduce or discount a number."""
    threads: dict[str, Any] = {"cpu_count": os.cpu_count()}
    try:
        threads["affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MOJOLLM_NUM_THREADS",
                "XLA_FLAGS", "CUDA_VISIBLE_DEVICES"):
        if os.environ.get(var):
            threads[var] = os.environ[var]
    if "torch" in sys.modules:
        threads["torch_num_threads"] = sys.modules["torch"].get_num_threads()
    versions = {"python": platform.python_version()}
    for dist in ("mojollm", "mojo", "max", "numpy", "torch", "jax", "jaxlib", "transformers"):
        v = _version(dist)
        if v:
            versions[dist] = v
    try:  # other processes on the machine skew CPU timings: say how busy it was
        load = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average": load,
        "host": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "memory_bytes": _total_memory_bytes(),
        "git_commit": _git_commit(),
        "versions": versions,
        "threads": threads,
    }


def _total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# the JSON envelope of bench/ results (bench/SCHEMA.md)

SCHEMA_VERSION = 1  # of the mojollm.bench.* kinds (mojollm.compare has its own: compare.SCHEMA_VERSION)


def bench_document(kind: str, config: dict, rows: list[dict], command: str | None = None) -> dict:
    """The envelope every bench/ script writes: `kind` is kernels | e2e | throughput (or the full
    `mojollm.bench.<kind>`); rows are flat dicts of scalars; `ok` is false if any row says so."""
    full = kind if kind.startswith("mojollm.") else f"mojollm.bench.{kind}"
    if command is None:
        import shlex

        command = shlex.join([os.path.basename(sys.executable)] + sys.argv)
    for i, row in enumerate(rows):
        bad = [k for k, v in row.items() if not (v is None or isinstance(v, (str, bool, int, float)))]
        if bad:
            raise ValueError(f"row {i}: values of {bad} are not scalars (bench rows must be flat)")
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": full,
        "command": command,
        "config": dict(config),
        "environment": environment_info(),
        "rows": list(rows),
        "ok": all(row.get("ok", True) is not False for row in rows),
    }
