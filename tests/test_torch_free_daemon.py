"""Imports run one way: the daemon and the CLI never import a stage (handlers.*) or an ML library (they must
survive any crash of a stage), and the shared contract package trainbox/ imports neither side."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO

ML_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers",
                "sentencepiece", "gguf", "sklearn", "scipy", "matplotlib", "optuna", "numpy")


def _loaded_after(imports: str, prefixes: tuple[str, ...]) -> list[str]:
    """Modules under ``prefixes`` that a fresh interpreter holds after running ``imports``."""
    code = (f"import sys\n{imports}\n"
            f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {prefixes!r})))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return out.stdout.split()


def test_daemon_and_cli_load_no_stage_and_no_ml_library() -> None:
    imports = ("import daemon.app, daemon.cli, daemon.supervisor, daemon.ingest, daemon.top, daemon.doctor, "
               "daemon.service, daemon.commands, daemon.modelregistry, daemon.modeltables, daemon.status\n"
               "daemon.cli.build_parser()")
    loaded = _loaded_after(imports, ("handlers", *ML_LIBRARIES))
    assert loaded == [], f"the daemon imported {loaded}"
    # the check above sees these imports (a typo in a name would make it pass vacuously)
    assert {"daemon.supervisor", "trainbox.preflight", "trainbox.protocol"} <= set(
        _loaded_after(imports, ("daemon", "trainbox")))


def test_trainbox_imports_neither_side() -> None:
    imports = "import pkgutil, importlib, trainbox\n" \
              "[importlib.import_module(m.name) for m in pkgutil.walk_packages(trainbox.__path__, 'trainbox.')]"
    loaded = _loaded_after(imports, ("daemon", "handlers", *ML_LIBRARIES))
    assert loaded == [], f"trainbox imported {loaded}"
    assert "trainbox.protocol" in _loaded_after(imports, ("trainbox",))
