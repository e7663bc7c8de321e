"""Take complete files from the inbox, validate them, and store them; nothing is lost or done twice.

A file is first *claimed* (renamed into state/ingesting/), then validated. Its store record names the
claim, and is written before the file is moved to its final place, so a crash at any point is finished
by ``recover()`` on the next start: a claim with a record is completed, one without is validated again.
"""
from __future__ import annotations

import fnmatch
import logging
import time
import uuid
from pathlib import Path
from typing import Callable

import yaml

from daemon.config import DaemonSettings
from daemon.errors import InvalidInput, Problem
from daemon.formats import read_examples
from daemon.fsio import move_durably, write_text_atomically
from daemon.jobfile import key_position, load_job_file
from daemon.jobs import new_job
from daemon.jobspec import JobSpec
from daemon.layout import Layout
from daemon.requirements import check_job
from daemon.status import ERROR_SUFFIX
from daemon.store import Q, Store, utcnow

log = logging.getLogger(__name__)
DATASET_SUFFIXES = (".jsonl",)
JOB_SUFFIXES = (".yaml", ".yml")
Notify = Callable[..., None]


class Ingestor:
    """Runs in the daemon's main thread only, so claims are processed one at a time, exactly once."""

    def __init__(self, layout: Layout, store: Store, settings: DaemonSettings, gpu_count: int,
                 notify: Notify):
        self.layout = layout
        self.store = store
        self.settings = settings
        self.gpu_count = gpu_count
        self.notify = notify
        self._refused: set[Path] = set()

    # claiming -------------------------------------------------------------
    def ingest(self, path: Path) -> None:
        """Claim ``path`` from the inbox and process it."""
        claim = self.layout.ingesting / f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}__{path.name}"
        try:
            move_durably(path, claim)
        except FileNotFoundError:
            return  # gone already (moved away by the user)
        except PermissionError as exc:
            # Windows: a writer still holds the file; elsewhere: not ours to move. The next rescan retries.
            if path not in self._refused:
                log.warning("cannot take %s from the inbox yet (%s); retrying on each rescan", path.name, exc)
                self._refused.add(path)
            return
        self._refused.discard(path)
        self.process_claim(claim)

    def recover(self) -> None:
        """Finish claims left by a crash (called at start, before the inbox is watched)."""
        for claim in sorted(self.layout.ingesting.iterdir()):
            if claim.is_file() and "__" in claim.name:
                log.info("finishing interrupted ingest of %s", claim.name.split("__", 1)[1])
                self.process_claim(claim)

    def process_claim(self, claim: Path) -> None:
        claim_id, name = claim.name.split("__", 1)
        done = self.store.datasets.get(Q.claim == claim_id) or self.store.jobs.get(Q.claim == claim_id)
        if done is not None:  # recorded before a crash: only the final move is missing
            target = self.layout.home / done["path"] if "sha256" in done else self.layout.job_dir(done["id"]) / "job.yaml"
            move_durably(claim, target)
            return
        suffix = Path(name).suffix.lower()
        try:
            if suffix in DATASET_SUFFIXES:
                self._ingest_dataset(claim, claim_id, name)
            elif suffix in JOB_SUFFIXES:
                self._ingest_job(claim, claim_id, name)
            else:
                raise InvalidInput(name, [Problem(
                    f"'{suffix or 'no extension'}' files are not taken",
                    fix="drop datasets as .jsonl (JSON Lines) and jobs as .yaml/.yml")], "unsupported file type")
        except InvalidInput as exc:
            self.reject(claim, name, exc.render())
        except OSError:
            raise  # storage trouble (disk full): the claim stays in state/ingesting and is retried
        except Exception as exc:  # a bug must not stop the daemon or loop on restart: set the file aside
            log.exception("internal error while ingesting %s", name)
            self.reject(claim, name, f"{name}: trainbox failed while reading this file ({exc!r}). The file is "
                                     "kept here unchanged; please report this with the daemon log.")

    # rejection ------------------------------------------------------------
    def reject(self, claim: Path, name: str, reason: str) -> Path:
        """Move the file to rejected/ with NAME.error.txt beside it (written first)."""
        target = self.layout.rejected / name
        if target.exists():  # an earlier file of that name: keep both
            stem, suffix = Path(name).stem, Path(name).suffix
            target = self.layout.rejected / f"{stem}.{claim.name.split('__', 1)[0]}{suffix}"
        text = (f"# trainbox rejected {name} at {utcnow()}\n"
                f"# fix the problems below and drop the file into the inbox again\n\n{reason}\n")
        write_text_atomically(target.with_name(target.name + ERROR_SUFFIX), text)
        move_durably(claim, target)
        log.warning("rejected %s -> %s\n%s", name, target, reason)
        self.store.add_event("file_rejected", f"{name}: {reason.splitlines()[0]}", file=name, path=str(target))
        self.notify("file_rejected", f"trainbox rejected {name}", reason.splitlines()[0], file=name)
        return target

    # datasets -------------------------------------------------------------
    def _ingest_dataset(self, claim: Path, claim_id: str, name: str) -> None:
        info, _ = read_examples(claim, name)
        existing = self.store.dataset(info.sha256)
        if existing is not None:
            raise InvalidInput(name, [Problem(
                f"the same content was already ingested as '{existing['name']}' on {existing['ingested_at']}; "
                "it is not trained again",
                fix=f"to train on it again, drop a job YAML with 'datasets: [{existing['name']}]'")],
                "duplicate dataset")
        rel = f"datasets/{info.sha256}.jsonl"
        delay = self.settings.default_job.delay_seconds if self.settings.default_job.enabled else None
        doc = {"sha256": info.sha256, "name": name, "format": info.format, "rows": info.rows,
               "labels": info.labels, "bytes": info.bytes, "path": rel, "claim": claim_id,
               "ingested_at": utcnow(), "default_job_due": time.time() + delay if delay is not None else None}
        with self.store.lock:
            self.store.datasets.insert(doc)
        move_durably(claim, self.layout.home / rel)
        log.info("dataset %s accepted: %d %s rows (%s)", name, info.rows, info.format, info.sha256[:12])
        self.store.add_event("dataset_ingested", f"{name}: {info.rows} {info.format} rows", sha256=info.sha256)
        self.link_waiting_jobs()

    # jobs -----------------------------------------------------------------
    def _ingest_job(self, claim: Path, claim_id: str, name: str) -> None:
        spec = load_job_file(claim, name)
        problems = check_job(spec, self.gpu_count)
        if problems:
            text = claim.read_text(encoding="utf-8-sig")
            for p in problems:
                if p.key:
                    p.line, p.column = key_position(text, p.key)
            raise InvalidInput(name, problems, "this job cannot run here")
        self.create_job(spec, source=f"inbox/{name}", claim=claim_id, job_file=claim)

    def create_job(self, spec: JobSpec, source: str, claim: str | None, job_file: Path | None = None) -> dict:
        doc = new_job(spec, source=source, claim=claim)
        job_dir = self.layout.job_dir(doc["id"])
        job_dir.mkdir(parents=True, exist_ok=True)
        with self.store.lock:
            self.store.insert_job(doc)
        if job_file is not None:
            move_durably(job_file, job_dir / "job.yaml")
        else:
            write_text_atomically(job_dir / "job.yaml", yaml.safe_dump(doc["spec"], sort_keys=False))
        log.info("job %s created from %s", doc["id"], source)
        self.store.add_event("job_created", f"{doc['id']} from {source}", job_id=doc["id"])
        self.link_waiting_jobs()
        return self.store.job(doc["id"]) or doc

    def link_waiting_jobs(self) -> None:
        """Queue every waiting job whose dataset patterns all match ingested datasets."""
        datasets = self.store.all_datasets()
        for job in self.store.jobs.search(Q.state == "waiting"):
            shas = resolve_datasets(job["spec"]["datasets"], datasets)
            if shas is None:
                continue
            self.store.update_job(job["id"], {"state": "queued", "datasets": shas})
            with self.store.lock:
                for sha in shas:  # a job claimed this dataset: no default job for it
                    self.store.datasets.update({"default_job_due": None}, Q.sha256 == sha)
            log.info("job %s queued (%d dataset(s))", job["id"], len(shas))

    def create_due_default_jobs(self) -> None:
        """A dataset dropped without a job gets ``default_job`` once its grace window has passed."""
        now = time.time()
        for ds in self.store.datasets.search((Q.default_job_due != None) & (Q.default_job_due <= now)):  # noqa: E711
            with self.store.lock:
                self.store.datasets.update({"default_job_due": None}, Q.sha256 == ds["sha256"])
            name = _job_name(Path(ds["name"]).stem)
            spec = self.settings.default_job.spec_for(ds["name"], name)
            spec.datasets = [ds["sha256"]]  # exactly this content, even if the name is reused later
            problems = check_job(spec, self.gpu_count)
            if problems:
                msg = "; ".join(p.render("default_job") for p in problems)
                log.error("no default job for %s: %s", ds["name"], msg)
                self.store.add_event("default_job_invalid", msg, sha256=ds["sha256"])
                continue
            self.create_job(spec, source=f"default_job for {ds['name']}", claim=None)


def _job_name(stem: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip("-._") or "dataset"
    return cleaned[:64]


def resolve_datasets(patterns: list[str], datasets: list[dict]) -> list[str] | None:
    """sha256 of the datasets the patterns name (newest per name), or None while one has no match.

    A pattern matches a dataset's file name, its name without ``.jsonl``, or its sha256 (prefix).
    """
    chosen: dict[str, dict] = {}
    for pattern in patterns:
        hits = [d for d in datasets
                if fnmatch.fnmatchcase(d["name"], pattern) or fnmatch.fnmatchcase(Path(d["name"]).stem, pattern)
                or (len(pattern) >= 8 and d["sha256"].startswith(pattern))]
        if not hits:
            return None
        newest: dict[str, dict] = {}
        for d in hits:  # datasets are sorted by ingest time: later ones win
            newest[d["name"]] = d
        for d in newest.values():
            chosen[d["sha256"]] = d
    return list(chosen)
