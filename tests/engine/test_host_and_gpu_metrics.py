"""Host gauges read from /proc (a fake one here), GPU gauges through NVML: a fake NVML module
handed to the monitor here, the real one on a machine with a GPU, and no GPU families (with one
log line saying why) where NVML cannot start."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from convoy.engine.hardware_metrics import GpuReader, HardwareMonitor, load_pynvml


def _write_proc(root, busy: int, idle: int, available_kib: int) -> None:
    # user nice system idle iowait irq softirq steal
    (root / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    (root / "meminfo").write_text(
        f"MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    {available_kib} kB\n"
    )


def _samples(collector) -> dict[str, float]:
    return {s.name: s.value for family in collector.collect() for s in family.samples}


def _by_gpu(collector) -> dict[str, dict[str, float]]:
    found: dict[str, dict[str, float]] = {}
    for family in collector.collect():
        for sample in family.samples:
            if "gpu_uuid" in sample.labels:
                found.setdefault(sample.name, {})[sample.labels["gpu_uuid"]] = sample.value
    return found


class FakeNvml:
    """The part of nvidia-ml-py's module the reader calls, for two GPUs; GPU 1 has no energy
    counter (older boards), so its energy is integrated from power."""

    class NVMLError(Exception):
        pass

    def __init__(self, start_fails: bool = False) -> None:
        self.start_fails = start_fails
        self.energy_mj = [5_000_000.0, None]
        self.power_mw = [250_000, 100_000]
        self.shut = False

    def nvmlInit(self):
        if self.start_fails:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-fake-{handle}".encode()

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=40 + handle)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=1 << 30, total=80 << 30)

    def nvmlDeviceGetPowerUsage(self, handle):
        return self.power_mw[handle]

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if self.energy_mj[handle] is None:
            raise self.NVMLError("Not Supported")
        return self.energy_mj[handle]

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=42, usedGpuMemory=3 << 20)]


def test_cpu_utilisation_is_the_busy_share_over_the_interval(tmp_path):
    _write_proc(tmp_path, busy=100, idle=900, available_kib=250)
    monitor = HardwareMonitor(gpu=False, proc=tmp_path)
    _write_proc(tmp_path, busy=130, idle=970, available_kib=250)  # 30 busy of 100 jiffies
    monitor.sample()
    samples = _samples(monitor)
    assert samples["nv_cpu_utilization"] == pytest.approx(0.3)
    assert samples["nv_cpu_memory_total_bytes"] == 1000 * 1024
    assert samples["nv_cpu_memory_used_bytes"] == 750 * 1024


def test_a_scrape_exports_the_last_sample_without_reading_proc_again(tmp_path):
    _write_proc(tmp_path, busy=100, idle=900, available_kib=250)
    monitor = HardwareMonitor(gpu=False, proc=tmp_path)
    _write_proc(tmp_path, busy=200, idle=900, available_kib=100)
    before = _samples(monitor)
    assert _samples(monitor) == before  # nothing sampled between two scrapes
    monitor.sample()
    assert _samples(monitor)["nv_cpu_memory_used_bytes"] == 900 * 1024


def test_without_proc_there_are_no_host_gauges(tmp_path):
    assert _samples(HardwareMonitor(gpu=False, proc=tmp_path / "missing")) == {}


def test_cpu_metrics_can_be_turned_off(tmp_path):
    _write_proc(tmp_path, busy=1, idle=1, available_kib=1)
    assert _samples(HardwareMonitor(cpu=False, gpu=False, proc=tmp_path)) == {}


def test_every_gpu_family_has_one_series_per_gpu(tmp_path):
    nvml = FakeNvml()
    monitor = HardwareMonitor(cpu=False, load_nvml=lambda: nvml, proc=tmp_path)
    nvml.energy_mj[0] += 1500.0  # 1.5 J since start
    monitor.sample()
    found = _by_gpu(monitor)
    uuids = {"GPU-fake-0", "GPU-fake-1"}
    for name in (
        "nv_gpu_utilization",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_memory_total_bytes",
        "nv_gpu_power_usage",
        "nv_gpu_power_limit",
        "nv_energy_consumption",
    ):
        assert set(found[name]) == uuids, name
    assert found["nv_gpu_utilization"]["GPU-fake-1"] == pytest.approx(0.41)
    assert found["nv_gpu_power_usage"]["GPU-fake-0"] == 250.0
    assert found["nv_gpu_power_limit"]["GPU-fake-0"] == 700.0
    assert found["nv_energy_consumption"]["GPU-fake-0"] == pytest.approx(1.5)
    monitor.close()
    assert nvml.shut


def test_energy_is_integrated_from_power_where_the_gpu_has_no_counter():
    nvml = FakeNvml()
    nvml.nvmlInit()
    reader = GpuReader(nvml, [0, 1], ["GPU-fake-0", "GPU-fake-1"])
    reader.read(now=10.0)
    readings = {r.uuid: r for r in reader.read(now=12.0)}  # 2 s at 100 W
    assert readings["GPU-fake-1"].energy_j == pytest.approx(200.0)


def test_without_a_driver_the_gpu_families_are_absent_and_the_log_says_why_once(caplog):
    caplog.set_level(logging.INFO, logger="convoy.metrics")
    monitor = HardwareMonitor(cpu=False, load_nvml=lambda: FakeNvml(start_fails=True))
    monitor.sample()
    monitor.sample()
    assert _by_gpu(monitor) == {}
    lines = [r.getMessage() for r in caplog.records if "GPU metrics are off" in r.getMessage()]
    assert lines == [
        "GPU metrics are off: NVML did not start (Driver Not Loaded): no NVIDIA driver on this machine?"
    ]


def test_without_nvidia_ml_py_the_log_names_the_extra(caplog):
    caplog.set_level(logging.INFO, logger="convoy.metrics")

    def missing():
        raise ImportError("No module named 'pynvml'")

    HardwareMonitor(cpu=False, load_nvml=missing)
    assert any("convoy-inference[gpu]" in r.getMessage() for r in caplog.records)


def test_gpu_families_are_off_when_not_allowed():
    nvml = FakeNvml()
    monitor = HardwareMonitor(cpu=False, gpu=False, load_nvml=lambda: nvml)
    assert _by_gpu(monitor) == {}


def test_real_nvml_gauges_have_one_series_per_gpu():
    reader, reason = GpuReader.open(load_pynvml)
    if reader is None:
        pytest.skip(f"no GPU metrics here: {reason}")
    try:
        monitor = HardwareMonitor(cpu=False)
        found = _by_gpu(monitor)
        uuids = set(found["nv_gpu_memory_total_bytes"])
        assert uuids and all(uuid.startswith("GPU-") for uuid in uuids)
        for name in (
            "nv_gpu_utilization",
            "nv_gpu_memory_used_bytes",
            "nv_gpu_power_usage",
            "nv_gpu_power_limit",
        ):
            assert set(found[name]) == uuids, name
        for value in found["nv_gpu_utilization"].values():
            assert 0.0 <= value <= 1.0
        monitor.close()
    finally:
        reader.close()
