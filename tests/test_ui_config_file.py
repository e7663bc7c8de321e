"""configs/daemon.yaml: loads with load_settings, shows every settings key, and every value is the default."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml
from pydantic import BaseModel

from daemon.config import DaemonSettings, load_settings

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "daemon.yaml"


def _missing(model: type[BaseModel], data: dict, prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        if name not in data:
            out.append(prefix + name)
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += _missing(field.annotation, data[name] or {}, f"{prefix}{name}.")
    return out


def test_commented_settings_file_loads_and_holds_the_defaults(tmp_path):
    shutil.copy(CONFIG, tmp_path / "daemon.yaml")
    assert load_settings(tmp_path) == DaemonSettings()
    raw = yaml.safe_load(CONFIG.read_text())
    assert _missing(DaemonSettings, raw) == []


def test_every_setting_line_has_a_comment():
    self_explaining = {"base_model"} | set(DaemonSettings().notify.events)  # job keys; event routes
    settings_lines = [line for line in CONFIG.read_text().splitlines() if re.match(r"^\s*[a-z_]+: \S", line)]
    uncommented = [line for line in settings_lines
                   if "#" not in line and line.split(":")[0].strip() not in self_explaining]
    assert len(settings_lines) > 30 and uncommented == [], uncommented
