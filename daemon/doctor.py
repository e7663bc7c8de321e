"""``trainbox doctor``: can this machine run trainbox, and what to fix if not. Stays torch-free itself."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from daemon.config import load_settings, resolve_home
from trainbox.errors import InvalidInput
from trainbox.protocol import EXIT_FAILED, EXIT_OK

# run in a child so the CLI never imports torch; prints one JSON object
_PROBE = r"""
import json, importlib
out = {}
for name in ("torch", "transformers", "peft", "bitsandbytes"):
    try:
        mod = importlib.import_module(name)
        out[name] = {"ok": True, "version": getattr(mod, "__version__", "?")}
    except Exception as exc:
        out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
if out["torch"]["ok"]:
    import torch
    cuda = torch.cuda.is_available()
    out["cuda"] = {"available": cuda, "version": torch.version.cuda,
                   "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []}
    import torch.distributed as dist

    def one_rank_all_reduce(backend, device):
        # a real process group of one rank: the backend initialises and moves a tensor through a collective
        if not dist.is_available():
            return {"ok": False, "error": "this torch build has no torch.distributed"}
        try:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            value = torch.ones(1, device=device)
            dist.all_reduce(value)
            return {"ok": value.item() == 1.0, "error": ""}
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    out["gloo"] = one_rank_all_reduce("gloo", "cpu")
    out["nccl"] = (one_rank_all_reduce("nccl", "cuda:0") if cuda else
                   {"ok": False, "error": "no CUDA GPU: NCCL needs one"})
print(json.dumps(out))
"""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True  # a failed required check means CPU training cannot work here
    wanted: bool = True  # False for a feature the settings leave off: its failure is shown as "off"

    @property
    def status(self) -> str:
        if self.ok:
            return "ok"
        return "FAIL" if self.required else ("warn" if self.wanted else "off")


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("doctor", parents=[common], help="check Python, torch, GPUs, disk and notifications")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)


def ml_stack_checks(timeout: float = 180) -> list[Check]:
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
        found = json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError):
        return [Check("torch", False, f"importing torch in {sys.executable} failed or took over {timeout:g}s",
                      f"run: {sys.executable} -c 'import torch' and fix the error it shows")]
    pip = f"{sys.executable} -m pip install"
    checks = []
    for name, required, fix in (("torch", True, f"{pip} torch (CPU: --index-url https://download.pytorch.org/whl/cpu)"),
                                ("transformers", True, f"{pip} 'trainbox' or {pip} transformers"),
                                ("peft", True, f"{pip} peft"),
                                ("bitsandbytes", False, f"{pip} bitsandbytes (only for 4/8-bit QLoRA on a GPU)")):
        info = found[name]
        checks.append(Check(name, info["ok"], info.get("version") or info.get("error", ""), "" if info["ok"] else fix,
                            required))
    cuda = found.get("cuda")
    if cuda is not None:
        detail = (f"CUDA {cuda['version']}: {', '.join(cuda['gpus'])}" if cuda["available"]
                  else "not available: training runs on the CPU")
        checks.append(Check("cuda", cuda["available"], detail, "" if cuda["available"] else
                            "for GPU training install a CUDA build of torch matching your driver "
                            "(https://pytorch.org/get-started/locally/)", required=False))
    checks += distributed_checks(found)
    return checks


def distributed_checks(found: dict) -> list[Check]:
    """gloo (CPU ranks) and NCCL (GPU ranks) for train.distributed, from the probe's one-rank all_reduce."""
    checks = []
    for backend, use, fix in (
            ("gloo", "CPU ranks (train.device: cpu with distributed.devices)",
             "install a torch build with torch.distributed (the official wheels have it)"),
            ("nccl", "several GPUs (train.distributed.devices)",
             "NCCL needs NVIDIA GPUs and a CUDA build of torch; without it distributed training runs only on CPU "
             "ranks")):
        info = found.get(backend)
        if info is None:
            continue
        checks.append(Check(backend, info["ok"], f"usable for {use}" if info["ok"] else info["error"],
                            "" if info["ok"] else fix, required=False))
    return checks


def home_checks(home: Path, min_free_gb: float) -> list[Check]:
    existing = home if home.exists() else next(p for p in home.parents if p.exists())
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".trainbox-doctor-"):
            pass
        writable = Check("home writable", True, str(home) + ("" if home.exists() else " (created on first run)"))
    except OSError as exc:
        writable = Check("home writable", False, f"{existing}: {exc.strerror}",
                         f"choose a writable --home or fix permissions: chown -R {os.environ.get('USER', 'you')} "
                         f"{existing}")
    free_gb = shutil.disk_usage(existing).free / 1e9
    disk = Check("disk space", free_gb >= min_free_gb, f"{free_gb:.1f} GB free at {existing}",
                 "" if free_gb >= min_free_gb else
                 f"free space (models and checkpoints need it) or lower resources.min_free_disk_gb ({min_free_gb:g})")
    return [writable, disk]


def gpu_checks() -> list[Check]:
    from daemon.gpus import gpu_readings

    gpus = gpu_readings()
    if not gpus:
        return [Check("nvml gpus", False, "no NVIDIA GPU visible through NVML",
                      "install the NVIDIA driver to use a GPU; CPU training works without", required=False)]
    return [Check("nvml gpus", True, "; ".join(
        f"{g['index']}: {g['name']} {g['memory_total_mib'] / 1024:.0f} GiB {g['temperature_c']}C" for g in gpus))]


def notify_checks(backend_settings) -> list[Check]:
    from daemon.notify.backends import available_backends, configured

    wanted = configured(backend_settings)
    return [Check(f"notify {name}", ok, reason if name in wanted else f"{reason} (not configured)",
                  "" if ok or name not in wanted else
                  "see notify.backends in configs/daemon.yaml; 'trainbox notify test' sends one",
                  required=False, wanted=name in wanted)
            for name, (ok, reason) in available_backends(backend_settings.model_copy(
                update={"desktop": True, "audio": True})).items()]


def run_checks(home: Path) -> list[Check]:
    py_ok = sys.version_info >= (3, 10)
    checks = [Check("python", py_ok, f"{sys.version.split()[0]} at {sys.executable}",
                    "" if py_ok else "install Python 3.10 or newer and reinstall trainbox")]
    try:
        settings = load_settings(home)
        checks.append(Check("daemon settings", True, "valid"))
    except InvalidInput as exc:
        from daemon.config import DaemonSettings

        settings = DaemonSettings()
        checks.append(Check("daemon settings", False, str(exc), "fix the file named above"))
    checks += ml_stack_checks()
    checks += home_checks(home, settings.resources.min_free_disk_gb)
    checks += gpu_checks()
    checks += notify_checks(settings.notify.backends)
    return checks


def cmd_doctor(args: argparse.Namespace) -> int:
    from rich.table import Table

    from daemon.cli import console, print_json

    checks = run_checks(resolve_home(args.home))
    usable = all(c.ok for c in checks if c.required)
    if args.json:
        print_json({"ok": usable, "checks": [{**asdict(c), "status": c.status} for c in checks]})
    else:
        table = Table(title="trainbox doctor", expand=True)
        for col in ("check", "status", "detail", "fix"):
            table.add_column(col, overflow="fold")
        style = {"ok": "green", "warn": "yellow", "FAIL": "bold red", "off": "dim"}
        for c in checks:
            table.add_row(c.name, f"[{style[c.status]}]{c.status}[/]", c.detail, c.fix)
        console.print(table)
        console.print("usable for CPU training" if usable else "[bold red]not usable yet:[/] fix the FAIL lines")
    return EXIT_OK if usable else EXIT_FAILED
