"""trainbox doctor: a real run on this machine, and the failures it must explain."""
from __future__ import annotations

import json
import subprocess
import sys

from daemon.config import NotifyBackendSettings
from daemon.doctor import Check, home_checks, notify_checks, run_checks

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_doctor_json_on_this_machine(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "daemon.cli", "doctor", "--json", "--home", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    report = json.loads(proc.stdout)
    by_name = {c["name"]: c for c in report["checks"]}
    assert proc.returncode == 0 and report["ok"] is True, proc.stdout + proc.stderr
    assert {"python", "daemon settings", "torch", "transformers", "peft", "bitsandbytes", "home writable",
            "disk space", "nvml gpus", "notify desktop", "notify audio", "notify webhook"} <= set(by_name)
    import torch  # the doctor's child must see the same torch as this interpreter
    assert by_name["torch"]["detail"] == torch.__version__
    assert by_name["cuda"]["status"] == ("ok" if torch.cuda.is_available() else "warn")
    assert by_name["gloo"]["status"] == "ok"  # a real one-rank gloo all_reduce ran in the doctor's child
    assert by_name["nccl"]["status"] == ("ok" if torch.cuda.is_available() else "warn")
    for check in report["checks"]:
        assert check["ok"] or check["fix"] or check["status"] == "off", check


def test_doctor_fails_with_a_fix_for_bad_settings_and_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr("daemon.doctor.ml_stack_checks", lambda: [])  # covered above; keep this test fast
    (tmp_path / "daemon.yaml").write_text("resources:\n  min_free_disk_gb: 1.0e+9\n")
    checks = {c.name: c for c in run_checks(tmp_path)}
    disk = checks["disk space"]
    assert disk.status == "FAIL" and "min_free_disk_gb" in disk.fix

    (tmp_path / "daemon.yaml").write_text("notify:\n  rate_limit_per_minit: 3\n")
    checks = {c.name: c for c in run_checks(tmp_path)}
    assert checks["daemon settings"].status == "FAIL"
    assert "rate_limit_per_minit" in checks["daemon settings"].detail


def test_home_checks_for_a_home_not_yet_created(tmp_path):
    writable, disk = home_checks(tmp_path / "new" / "home", min_free_gb=0.0)
    assert writable.ok and "created on first run" in writable.detail
    assert disk.ok and str(tmp_path) in disk.detail


def test_notify_lines_mark_unconfigured_backends_off():
    lines = {c.name: c for c in notify_checks(NotifyBackendSettings(desktop=False, audio=False))}
    assert lines["notify webhook"].status == "off" and lines["notify webhook"].fix == ""
    assert isinstance(lines["notify audio"], Check)


def test_doctor_reports_a_typo_in_default_job(tmp_path, monkeypatch):
    monkeypatch.setattr("daemon.doctor.ml_stack_checks", lambda: [])
    (tmp_path / "daemon.yaml").write_text("default_job:\n  job:\n    train: {max_stpes: 3}\n")
    check = {c.name: c for c in run_checks(tmp_path)}["daemon settings"]
    assert check.status == "FAIL"
    assert "default_job.job.train.max_stpes: is not a field" in check.detail
    assert "did you mean default_job.job.train.max_steps?" in check.detail
