"""Host and GPU gauges, sampled every --metrics-interval-ms (Triton's "per interval" metrics).

A monitor thread reads /proc (CPU utilisation over the interval, memory) and NVML (per GPU:
utilisation, memory, power and its limit, energy since start) once per interval; a scrape
exports the latest sample, so it costs no /proc or NVML calls and its values do not depend on
how often Prometheus scrapes.

NVML comes from nvidia-ml-py (the `gpu` extra), through a loader the monitor is given: the real
one imports `pynvml`; tests hand a fake module with the same functions. Without the package, a
driver or a GPU the GPU families are absent and the log says why, once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("convoy.metrics")


def load_pynvml() -> Any:
    """nvidia-ml-py's module, untyped (raises ImportError when it is not installed)."""
    import pynvml

    return pynvml


# --- host ----------------------------------------------------------------------------------------
class HostReader:
    """CPU busy share since the previous read, and memory, from /proc."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self._proc = proc
        self._previous = self._cpu_times()

    def _cpu_times(self) -> tuple[int, int] | None:
        """(busy, total) jiffies over all CPUs, or None without /proc."""
        try:
            with (self._proc / "stat").open() as handle:
                fields = [int(v) for v in handle.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return total - idle, total

    def utilization(self) -> float | None:
        now = self._cpu_times()
        previous, self._previous = self._previous, now
        if now is None or previous is None:
            return None
        busy, total = now[0] - previous[0], now[1] - previous[1]
        return busy / total if total > 0 else 0.0

    def memory(self) -> tuple[int, int] | None:
        """(used, total) bytes, used being total minus what is available, or None."""
        values = {}
        try:
            with (self._proc / "meminfo").open() as handle:
                for line in handle:
                    key, _, rest = line.partition(":")
                    if key in ("MemTotal", "MemAvailable"):
                        values[key] = int(rest.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        if len(values) != 2:
            return None
        return values["MemTotal"] - values["MemAvailable"], values["MemTotal"]


# --- GPUs ----------------------------------------------------------------------------------------
@dataclass(slots=True)
class GpuReading:
    uuid: str
    utilization: float | None = None
    memory_used: int | None = None
    memory_total: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    energy_j: float | None = None


class GpuReader:
    """Every visible GPU through an NVML module (`pynvml`, or a test's fake of it)."""

    def __init__(self, nvml: Any, handles: list[Any], uuids: list[str]) -> None:
        # `nvml` is pynvml (untyped) or a test's stand-in; `handles` are its opaque device handles.
        self._nvml = nvml
        self._devices = list(zip(uuids, handles, strict=True))
        #: Energy counter (mJ) at start per GPU; None where the GPU has no such counter, whose
        #: energy is then integrated from power readings.
        self._energy_start: dict[str, float | None] = {}
        self._integrated: dict[str, float] = {}
        self._last_read: float | None = None
        for uuid, handle in self._devices:
            try:
                self._energy_start[uuid] = float(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
            except nvml.NVMLError:
                self._energy_start[uuid] = None
                self._integrated[uuid] = 0.0

    @classmethod
    def open(cls, load_nvml: Callable[[], Any] = load_pynvml) -> tuple[GpuReader | None, str]:
        """(a reader over every visible GPU, "") or (None, why there are no GPU metrics)."""
        try:
            nvml = load_nvml()
        except ImportError:
            return None, ("nvidia-ml-py is not installed (pip install 'convoy-inference[gpu]')")
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            return None, f"NVML did not start ({exc}): no NVIDIA driver on this machine?"
        try:
            count = nvml.nvmlDeviceGetCount()
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
        except nvml.NVMLError as exc:
            nvml.nvmlShutdown()
            return None, f"NVML sees no usable GPU ({exc})"
        if not handles:
            nvml.nvmlShutdown()
            return None, "NVML started but sees no GPU"
        return cls(nvml, handles, uuids), ""

    @property
    def uuids(self) -> list[str]:
        return [uuid for uuid, _ in self._devices]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()

    def read(self, now: float | None = None) -> list[GpuReading]:
        nvml = self._nvml
        now = time.monotonic() if now is None else now
        elapsed = 0.0 if self._last_read is None else now - self._last_read
        self._last_read = now
        readings = []
        for uuid, handle in self._devices:
            reading = GpuReading(uuid)
            # Each reading on its own: a GPU that cannot report one (no power sensor) still
            # reports the others.
            with contextlib.suppress(nvml.NVMLError):
                reading.utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
            with contextlib.suppress(nvml.NVMLError):
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                reading.memory_used, reading.memory_total = memory.used, memory.total
            with contextlib.suppress(nvml.NVMLError):
                reading.power_w = nvml.nvmlDeviceGetPowerUsage(handle) / 1000  # mW -> W
            with contextlib.suppress(nvml.NVMLError):
                reading.power_limit_w = nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000
            start = self._energy_start.get(uuid)
            if start is not None:
                with contextlib.suppress(nvml.NVMLError):
                    total_mj = float(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
                    reading.energy_j = (total_mj - start) / 1000
            elif reading.power_w is not None:
                self._integrated[uuid] += reading.power_w * elapsed
                reading.energy_j = self._integrated[uuid]
            readings.append(reading)
        return readings

    def process_memory(self, device: int, pid: int) -> int | None:
        """Bytes of GPU `device`'s memory held by process `pid`, or None when NVML cannot say."""
        nvml = self._nvml
        try:
            handle = self._devices[device][1]
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except (IndexError, nvml.NVMLError):
            return None
        for process in processes:
            if process.pid == pid:
                return int(process.usedGpuMemory or 0)
        return 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- the monitor ---------------------------------------------------------------------------------
@dataclass(slots=True)
class HardwareSample:
    cpu_utilization: float | None = None
    memory: tuple[int, int] | None = None
    gpus: tuple[GpuReading, ...] = ()


class HardwareMonitor(Collector):
    """Samples the host and GPUs every `interval_s` on its own thread; collects the latest."""

    def __init__(
        self,
        interval_s: float = 2.0,
        cpu: bool = True,
        gpu: bool = True,
        load_nvml: Callable[[], Any] = load_pynvml,
        proc: Path = Path("/proc"),
    ) -> None:
        self.interval_s = interval_s
        self._host = HostReader(proc) if cpu else None
        self.gpu: GpuReader | None = None
        #: Why there are no GPU metrics ("" when there are, or when they were turned off).
        self.gpu_absent_reason = ""
        if gpu:
            self.gpu, self.gpu_absent_reason = GpuReader.open(load_nvml)
            if self.gpu is None:
                log.info("GPU metrics are off: %s", self.gpu_absent_reason)
            else:
                log.info(
                    "GPU metrics on for %d GPU(s): %s", len(self.gpu.uuids), ", ".join(self.gpu.uuids)
                )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.latest = HardwareSample()
        self.sample()

    def sample(self) -> HardwareSample:
        """Read everything now (the monitor thread's step; tests call it directly)."""
        sample = HardwareSample()
        if self._host is not None:
            sample.cpu_utilization = self._host.utilization()
            sample.memory = self._host.memory()
        if self.gpu is not None:
            try:
                sample.gpus = tuple(self.gpu.read())
            except Exception:
                log.exception("reading the GPUs through NVML failed")
        self.latest = sample  # one reference swap: a scrape sees one whole sample
        return sample

    def start(self) -> None:
        if self._thread is None and (self._host is not None or self.gpu is not None):
            self._thread = threading.Thread(target=self._run, name="convoy-hardware", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.gpu is not None:
            self.gpu.close()
            self.gpu = None

    def collect(self) -> Iterator[Metric]:
        sample = self.latest
        if sample.cpu_utilization is not None:
            yield GaugeMetricFamily(
                "nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]", value=sample.cpu_utilization
            )
        if sample.memory is not None:
            yield GaugeMetricFamily(
                "nv_cpu_memory_used_bytes", "CPU memory used, in bytes", value=sample.memory[0]
            )
            yield GaugeMetricFamily(
                "nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes", value=sample.memory[1]
            )
        if self.gpu is None and not sample.gpus:
            return
        labels = ["gpu_uuid"]
        families = (
            (
                GaugeMetricFamily(
                    "nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", labels=labels
                ),
                "utilization",
            ),
            (
                GaugeMetricFamily(
                    "nv_gpu_memory_total_bytes", "GPU total memory, in bytes", labels=labels
                ),
                "memory_total",
            ),
            (
                GaugeMetricFamily(
                    "nv_gpu_memory_used_bytes", "GPU used memory, in bytes", labels=labels
                ),
                "memory_used",
            ),
            (
                GaugeMetricFamily("nv_gpu_power_usage", "GPU power usage in watts", labels=labels),
                "power_w",
            ),
            (
                GaugeMetricFamily(
                    "nv_gpu_power_limit", "GPU power management limit in watts", labels=labels
                ),
                "power_limit_w",
            ),
        )
        for family, attribute in families:
            for reading in sample.gpus:
                value = getattr(reading, attribute)
                if value is not None:
                    family.add_metric([reading.uuid], value)
            yield family
        # A counter under Triton's exact name (untyped, like the nv_* request counters).
        energy = Metric(
            "nv_energy_consumption",
            "GPU energy consumption in joules since the server started",
            "unknown",
        )
        for reading in sample.gpus:
            if reading.energy_j is not None:
                energy.add_sample("nv_energy_consumption", {"gpu_uuid": reading.uuid}, reading.energy_j)
        yield energy
