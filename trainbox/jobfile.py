"""Read a job YAML file into a ``JobSpec`` (bounded, never through a link; errors carry line, key and fix)."""
from __future__ import annotations

from pathlib import Path

from trainbox.jobspec import JobSpec
from trainbox.untrusted import read_capped
from trainbox.yamlmodel import decode_utf8, parse_yaml_model

MAX_JOB_BYTES = 64_000  # a job is a few lines; PyYAML reads ~100 kB/s at worst, so this bounds the time too


def load_job_file(path: Path, name: str | None = None) -> JobSpec:
    """Parse and validate a job YAML file (a regular file, never through a link, at most MAX_JOB_BYTES)."""
    name = name or Path(path).name
    return parse_job_text(decode_utf8(name, read_capped(Path(path), MAX_JOB_BYTES, name, "job file")), name)


def parse_job_text(text: str, name: str) -> JobSpec:
    return parse_yaml_model(text, name, JobSpec, examples="configs/jobs/*.yaml")
