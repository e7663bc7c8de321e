"""The daemon side never imports torch or transformers (it must survive any crash of a stage)."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_daemon_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import daemon.app, daemon.cli, daemon.requirements, daemon.top, daemon.doctor, daemon.service\n"
        "daemon.cli.build_parser()\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "", f"daemon imported {out.stdout.strip()}"
