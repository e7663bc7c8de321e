"""Take complete files from the inbox, validate them, and store them; nothing is lost or done twice.

A file is first *claimed* (renamed into state/ingesting/), then validated. Its store record names the
claim, and is written before the file is moved to its final place, so a crash at any point is finished
by ``recover()`` on the next start: a claim with a record is completed, one without is validated again.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable

import yaml

from daemon.config import DaemonSettings
from daemon.datasetcheck import DatasetChecker, check_dataset
from daemon.jobs import JobRecord, new_job, utcnow
from daemon.layout import Layout
from daemon.rejects import set_aside
from daemon.store import Store
from trainbox.errors import InvalidInput, Problem
from trainbox.fsio import move_durably, write_bytes_atomically, write_text_atomically
from trainbox.jobfile import MAX_JOB_BYTES, parse_job_text
from trainbox.jobspec import JobSpec
from trainbox.preflight import check_job
from trainbox.rows import DatasetInfo
from trainbox.untrusted import is_per_file_error, not_regular_problem, read_capped, shown_name
from trainbox.yamlmodel import decode_utf8, key_position

log = logging.getLogger(__name__)
DATASET_SUFFIXES = (".jsonl",)
JOB_SUFFIXES = (".yaml", ".yml")
Notify = Callable[..., None]
# a claim that was being read when the daemon died this many times is set aside, not read again
MAX_RECOVER_ATTEMPTS = 2
MAX_DATASETS_IN_FLIGHT = 2  # one being checked, one queued behind it


class Ingestor:
    """Runs in the daemon's main thread only, so claims are processed one at a time, exactly once."""

    def __init__(self, layout: Layout, store: Store, settings: DaemonSettings, gpu_count: int,
                 notify: Notify, checker: DatasetChecker | None = None):
        self.layout = layout
        self.store = store
        self.settings = settings
        self.gpu_count = gpu_count
        self.notify = notify
        self.checker = checker  # None: datasets are validated in the calling thread (tests, tools)
        self._max_dataset_bytes = int(settings.limits.max_dataset_mb * 1e6)
        self._refused: set[Path] = set()

    # claiming -------------------------------------------------------------
    def ingest(self, path: Path) -> None:
        """Claim ``path`` from the inbox and process it."""
        claim_id = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
        claim = self.layout.ingesting / f"{claim_id}__{path.name}"
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
        except OSError as exc:
            if not is_per_file_error(exc):
                raise  # storage trouble: the daemon pauses and retries
            # e.g. a legal 246-byte name that is too long once prefixed for the claim: this file only
            shown = shown_name(path.name)
            self.reject(path, path.name, claim_id, InvalidInput(shown, [Problem(
                f"cannot be taken from the inbox: {exc.strerror} ({len(os.fsencode(path.name))}-byte name)",
                fix="rename it to a shorter name (under 200 bytes) and drop it again")], "name not usable").render())
            return
        self._refused.discard(path)
        self.process_claim(claim)

    def can_take(self, path: Path) -> bool:
        """False for a dataset while the background checker has enough queued: it waits in the inbox,
        so claims stay few (a crash leaves little to recover) and the inbox shows what is not yet read."""
        return (self.checker is None or path.suffix.lower() not in DATASET_SUFFIXES
                or len(self.checker.in_flight) < MAX_DATASETS_IN_FLIGHT)

    def recover(self, at_start: bool = True) -> None:
        """Finish claims left by a crash (at start, before the inbox is watched) or by a storage error.

        At start each attempt is recorded first, so a file that kills or hangs the daemon is set aside
        after ``MAX_RECOVER_ATTEMPTS`` restarts instead of stopping every restart.
        """
        for claim in sorted(self.layout.ingesting.iterdir()):
            if claim.name.startswith(".") and claim.name.endswith(".tmp"):
                claim.unlink()  # a private copy a crash cut short; the claim itself is still there
                continue
            if "__" not in claim.name:
                continue
            claim_id, name = claim.name.split("__", 1)
            if at_start and self.store.count_recover_attempt(claim_id) > MAX_RECOVER_ATTEMPTS:
                self.reject(claim, name, claim_id, InvalidInput(shown_name(name), [Problem(
                    f"trainbox stopped {MAX_RECOVER_ATTEMPTS + 1} times while reading this file, so it is set aside",
                    fix="check the file, then drop it again; please report it with logs/daemon.log")],
                    "could not be read").render())
                self.store.forget_claim(claim_id)
                continue
            log.info("finishing interrupted ingest of %s", shown_name(name))
            self.process_claim(claim, background=not at_start)  # at start: counted, so in this thread
            if at_start:
                self.store.forget_claim(claim_id)

    def process_claim(self, claim: Path, background: bool = True) -> None:
        """Validate and store (or reject) one claim; ``background``: datasets go to the checker thread."""
        if self.checker is not None and claim in self.checker.in_flight:
            return  # being validated in the background
        claim_id, name = claim.name.split("__", 1)
        dataset, job = self.store.claimed_record(claim_id)
        if dataset is not None or job is not None:  # recorded before a crash: only the final move is missing
            move_durably(claim, self.layout.home / dataset["path"] if dataset is not None
                         else self.layout.job_dir(job.id) / "job.yaml")
            return
        self._settle(claim, name, lambda: self._dispatch(claim, claim_id, name, background))

    def finish_checked(self) -> None:
        """Store or reject the datasets the background checker has finished (main loop)."""
        if self.checker is None:
            return
        for claim, name, result in self.checker.finished():
            self._settle(claim, name, lambda: self._store_dataset(claim, claim.name.split("__", 1)[0],
                                                                  shown_name(name), result))

    def _dispatch(self, claim: Path, claim_id: str, name: str, background: bool) -> None:
        shown = shown_name(name)
        suffix = Path(name).suffix.lower()
        st = os.lstat(claim)
        problem = not_regular_problem(st.st_mode)  # a link, FIFO, device: never opened
        if problem is not None:
            raise InvalidInput(shown, [problem], "not a regular file")
        if st.st_nlink > 1:  # a hard link shares its content with a file elsewhere: keep a private copy
            limit, what = ((self._max_dataset_bytes, "dataset") if suffix in DATASET_SUFFIXES
                           else (MAX_JOB_BYTES, "job file"))
            write_bytes_atomically(claim, read_capped(claim, limit, shown, what))
        if suffix in DATASET_SUFFIXES and background and self.checker is not None:
            self.checker.submit(claim, name)
        elif suffix in DATASET_SUFFIXES:
            self._store_dataset(claim, claim_id, shown, check_dataset(claim, shown, self._max_dataset_bytes))
        elif suffix in JOB_SUFFIXES:
            self._ingest_job(claim, claim_id, shown)
        else:
            raise InvalidInput(shown, [Problem(
                f"'{suffix or 'no extension'}' files are not taken",
                fix="drop datasets as .jsonl (JSON Lines) and jobs as .yaml/.yml")], "unsupported file type")

    def _settle(self, claim: Path, name: str, work: Callable[[], None]) -> None:
        """Run ``work`` for a claim; a problem with the file rejects it, a storage problem propagates."""
        claim_id = claim.name.split("__", 1)[0]
        shown = shown_name(name)
        try:
            work()
        except InvalidInput as exc:
            self.reject(claim, name, claim_id, exc.render())
            if Path(name).suffix.lower() in DATASET_SUFFIXES:
                self.flag_jobs_waiting_on_rejected()
        except OSError as exc:
            if not is_per_file_error(exc):
                raise  # storage trouble (disk full): the claim stays in state/ingesting and is retried
            self.reject(claim, name, claim_id, f"{shown}: cannot be read: {exc.strerror}\n"
                                               "    fix: drop a regular, readable file")
        except Exception as exc:  # a bug must not stop the daemon or loop on restart: set the file aside
            log.exception("internal error while ingesting %s", shown)
            self.reject(claim, name, claim_id, f"{shown}: trainbox failed while reading this file ({exc!r}). The "
                                               "file is kept here unchanged; please report this with the daemon log.")

    # rejection ------------------------------------------------------------
    def reject(self, src: Path, name: str, claim_id: str, reason: str) -> Path:
        """Set ``src`` aside in rejected/ with its explanation; record, log and notify it."""
        shown = shown_name(name)
        target = set_aside(self.layout.rejected, src, name, claim_id,
                           f"# trainbox rejected {shown} at {utcnow()} (claim {claim_id})\n"
                           f"# fix the problems below and drop the file into the inbox again\n\n{reason}\n")
        log.warning("rejected %s -> %s\n%s", shown, shown_name(str(target)), reason)
        first = reason.splitlines()[0]
        self.store.add_event("file_rejected", f"{shown}: {first}", file=shown, path=shown_name(str(target)))
        self.notify("file_rejected", f"trainbox rejected {shown}", first, file=shown)
        return target

    # datasets -------------------------------------------------------------
    def _store_dataset(self, claim: Path, claim_id: str, name: str, info: DatasetInfo | BaseException) -> None:
        if isinstance(info, BaseException):  # raised by the background check
            raise info
        existing = self.store.dataset(info.sha256)
        if existing is not None:
            if name != existing["name"] and name not in existing.get("also_named", []):
                self.store.add_dataset_name(info.sha256, name)  # a job naming this copy means the stored content
                self.link_waiting_jobs()
            raise InvalidInput(name, [Problem(
                f"the same content was already ingested as '{existing['name']}' on {existing['ingested_at']}; "
                "it is not trained again (jobs naming this file use the stored copy)",
                fix=f"to train on it again, drop a job YAML with 'datasets: [{existing['name']}]'")],
                "duplicate dataset")
        rel = f"datasets/{info.sha256}.jsonl"
        delay = self.settings.default_job.delay_seconds if self.settings.default_job.enabled else None
        doc = {"sha256": info.sha256, "name": name, "format": info.format, "rows": info.rows,
               "labels": info.labels, "bytes": info.bytes, "path": rel, "claim": claim_id,
               "ingested_at": utcnow(), "default_job_due": time.time() + delay if delay is not None else None}
        self.store.insert_dataset(doc)
        move_durably(claim, self.layout.home / rel)
        log.info("dataset %s accepted: %d %s rows (%s)", name, info.rows, info.format, info.sha256[:12])
        for note in info.notes:
            log.info("%s", note)
        self.store.add_event("dataset_ingested", f"{name}: {info.rows} {info.format} rows", sha256=info.sha256)
        self.link_waiting_jobs()

    # jobs -----------------------------------------------------------------
    def _ingest_job(self, claim: Path, claim_id: str, name: str) -> None:
        text = decode_utf8(name, read_capped(claim, MAX_JOB_BYTES, name, "job file"))
        spec = parse_job_text(text, name)
        problems = check_job(spec, self.gpu_count)
        if problems:
            for p in problems:
                if p.key:
                    p.line, p.column = key_position(text, p.key)
            raise InvalidInput(name, problems, "this job cannot run here")
        self.create_job(spec, source=f"inbox/{name}", claim=claim_id, job_file=claim)

    def create_job(self, spec: JobSpec, source: str, claim: str | None, job_file: Path | None = None) -> JobRecord:
        job = new_job(spec, source=source, claim=claim)
        job_dir = self.layout.job_dir(job.id)
        job_dir.mkdir(parents=True, exist_ok=True)
        self.store.insert_job(job)
        if job_file is not None:
            move_durably(job_file, job_dir / "job.yaml")
        else:
            write_text_atomically(job_dir / "job.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        log.info("job %s created from %s", job.id, source)
        self.store.add_event("job_created", f"{job.id} from {source}", job_id=job.id)
        self.link_waiting_jobs()
        return self.store.job(job.id) or job

    def link_waiting_jobs(self) -> None:
        """Queue every waiting job whose dataset patterns all match ingested datasets."""
        datasets = self.store.all_datasets()
        for job in self.store.jobs_in("waiting"):
            shas = resolve_datasets(job.spec.datasets, datasets)
            if shas is None:
                continue
            self.store.update_job(job.id, lambda j, shas=shas: _queue_on(j, shas))
            for sha in shas:  # a job claimed this dataset: no default job for it
                self.store.clear_default_job(sha)
            log.info("job %s queued (%d dataset(s))", job.id, len(shas))
        self.flag_jobs_waiting_on_rejected()

    def flag_jobs_waiting_on_rejected(self) -> None:
        """A waiting job whose dataset was rejected for its content says so (state, ``show``, notification)."""
        rejected = [e for e in self.store.events_of_kind("file_rejected")
                    if Path(e.get("file", "")).suffix.lower() in DATASET_SUFFIXES]
        if not rejected:
            return
        datasets = self.store.all_datasets()
        for job in self.store.jobs_in("waiting"):
            missing = [p for p in job.spec.datasets if resolve_datasets([p], datasets) is None]
            hits = [e for e in rejected if any(name_matches(p, e["file"]) for p in missing)]
            if not hits:
                continue
            newest = hits[-1]
            why = newest["message"].removeprefix(f"{newest['file']}: ").removeprefix(f"{newest['file']}: ")
            error = (f"waiting for a dataset, but {newest['file']} was rejected: {why} "
                     f"(see {newest.get('path')}.error.txt; fix it and drop it again)")
            if job.error == error:
                continue
            self.store.set_job_fields(job.id, error=error)
            log.warning("job %s cannot start yet: %s", job.id, error)
            self.notify("file_rejected", f"trainbox: job {job.name} cannot start", error, job_id=job.id)

    def create_due_default_jobs(self) -> None:
        """A dataset dropped without a job gets ``default_job`` once its grace window has passed."""
        now = time.time()
        for ds in self.store.datasets_due(now):
            # the due time is cleared only once the job exists (create_job links it): a crash or a full
            # disk in between retries, and a job already created then is recognised, not made twice
            if self.store.job_for_datasets([ds["sha256"]]):
                self.store.clear_default_job(ds["sha256"])
                self.link_waiting_jobs()  # the interrupted create_job did not get to queue it
                continue
            # settings were validated at load (config.py), so this spec is valid
            spec = self.settings.default_job.spec_for(ds["sha256"], _job_name(Path(ds["name"]).stem))
            problems = check_job(spec, self.gpu_count)
            if problems:
                msg = "; ".join(p.render("default_job") for p in problems)
                log.error("no default job for %s: %s", ds["name"], msg)
                self.store.clear_default_job(ds["sha256"])
                self.store.add_event("default_job_invalid", msg, sha256=ds["sha256"])
                self.notify("file_rejected", f"trainbox: no job for {ds['name']}", msg, file=ds["name"])
                continue
            self.create_job(spec, source=f"default_job for {ds['name']}", claim=None)


def _queue_on(job: JobRecord, shas: list[str]) -> None:
    job.move_to("queued")
    job.datasets, job.error = shas, None


def _job_name(stem: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip("-._") or "dataset"
    return cleaned[:64]


def name_matches(pattern: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(Path(name).stem, pattern)


def resolve_datasets(patterns: list[str], datasets: list[dict]) -> list[str] | None:
    """sha256 of the datasets the patterns name (newest per name), or None while one has no match.

    A pattern matches a dataset's file name, its name without ``.jsonl``, or its sha256 (prefix).
    """
    chosen: dict[str, dict] = {}
    for pattern in patterns:
        hits = [d for d in datasets
                if any(name_matches(pattern, n) for n in (d["name"], *d.get("also_named", ())))
                or (len(pattern) >= 8 and d["sha256"].startswith(pattern))]
        if not hits:
            return None
        newest: dict[str, dict] = {}
        for d in hits:  # datasets are sorted by ingest time: later ones win
            newest[d["name"]] = d
        for d in newest.values():
            chosen[d["sha256"]] = d
    return list(chosen)
