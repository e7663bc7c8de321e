"""The daemon's use of the shared resource rules: free disk always, machine readings only when asked."""
from __future__ import annotations

from pathlib import Path

from daemon.resources import ResourceWatch, daemon_snapshot


def test_daemon_snapshot_reads_disk_always_and_the_machine_on_request(tmp_path: Path) -> None:
    disk_only = daemon_snapshot(tmp_path, machine=False)
    assert set(disk_only) == {"disk_free_gb", "disk_path"} and disk_only["disk_free_gb"] > 0
    full = daemon_snapshot(tmp_path, machine=True)
    assert 0 <= full["ram_percent"] <= 100 and isinstance(full["gpus"], list)


def test_low_disk_warns_once_per_interval_and_absent_readings_are_not_checked(tmp_path: Path) -> None:
    sent = []
    watch = ResourceWatch({"min_free_disk_gb": 10}, lambda *a, **k: sent.append((a, k)), repeat_seconds=600)
    low = {"disk_free_gb": 2.5, "disk_path": str(tmp_path)}
    assert watch.check(low, now=0) == ["disk"]
    assert watch.check(low, now=300) == []
    assert watch.check(low, now=600) == ["disk"]
    assert "only 2.5 GB free on" in sent[0][0][1] and sent[0][1]["resource"] == "disk"
    assert watch.check({"disk_free_gb": 50.0}, now=1200) == []
