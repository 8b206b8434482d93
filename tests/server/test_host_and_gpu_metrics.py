"""Host gauges read from /proc (a fake one here), and GPU gauges on a machine with a GPU."""

from __future__ import annotations

import pytest

from convoy.engine.metrics import GpuCollector, HostCollector


def _write_proc(root, busy: int, idle: int, available_kib: int) -> None:
    # user nice system idle iowait irq softirq steal
    (root / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    (root / "meminfo").write_text(
        f"MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    {available_kib} kB\n"
    )


def _samples(collector) -> dict[str, float]:
    return {s.name: s.value for family in collector.collect() for s in family.samples}


def test_cpu_utilisation_is_the_busy_share_since_the_last_scrape(tmp_path):
    _write_proc(tmp_path, busy=100, idle=900, available_kib=250)
    collector = HostCollector(tmp_path)
    _write_proc(tmp_path, busy=130, idle=970, available_kib=250)  # 30 busy of 100 jiffies
    samples = _samples(collector)
    assert samples["nv_cpu_utilization"] == pytest.approx(0.3)
    assert samples["nv_cpu_memory_total_bytes"] == 1000 * 1024
    assert samples["nv_cpu_memory_used_bytes"] == 750 * 1024


def test_without_proc_there_are_no_host_gauges(tmp_path):
    assert _samples(HostCollector(tmp_path / "missing")) == {}


def test_gpu_gauges_have_one_series_per_gpu():
    collector = GpuCollector.open()
    if collector is None:
        pytest.skip("nvidia-ml-py is not installed or sees no GPU")
    try:
        families = {family.name: family for family in collector.collect()}
        uuids = {s.labels["gpu_uuid"] for s in families["nv_gpu_memory_total_bytes"].samples}
        assert uuids and all(uuid.startswith("GPU-") for uuid in uuids)
        for name in ("nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_power_usage"):
            assert {s.labels["gpu_uuid"] for s in families[name].samples} == uuids
        for sample in families["nv_gpu_utilization"].samples:
            assert 0.0 <= sample.value <= 1.0
    finally:
        collector.close()
