"""The ``llm`` backend: any OpenAI-compatible chat endpoint, with retries, concurrency and an on-disk cache
keyed by (prompt, model, seed), so a resumed or repeated job does not ask twice."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from handlers.augment.rewriter import INSTRUCTIONS, Request
from trainbox.errors import StageFailed
from trainbox.fsio import write_json_atomically
from trainbox.jobspec import LlmSpec

log = logging.getLogger(__name__)
SYSTEM = ("You rewrite one chat reply at a time. Keep its meaning and facts. Answer with the rewritten reply "
          "only: no preamble, no quotes, no notes.")
RETRYABLE = (429, 500, 502, 503, 504)


def chat_messages(request: Request) -> list[dict[str, str]]:
    """The prompt sent for one request (also the cache key's prompt part)."""
    user = (f"The user said:\n{request.context}\n\nThe reply was:\n{request.text}\n\n"
            f"Rewrite the reply so that it {INSTRUCTIONS[request.target]}.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


class LlmRewriter:
    """Rewrites through ``spec.url``/chat/completions; cache hits and misses are counted for the stats."""

    name = "llm"

    def __init__(self, spec: LlmSpec, seed: int, cache_dir: Path):
        self.spec, self.seed, self.model = spec, seed, spec.model
        self.cache_dir = cache_dir
        self.hits = self.misses = 0
        self._count = threading.Lock()
        self._in_flight = threading.BoundedSemaphore(spec.concurrency)  # across every thread that calls rewrite

    def rewrite(self, requests: list[Request]) -> list[str | None]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(len(requests), self.spec.concurrency)) as pool:
            answers = list(pool.map(self._one, requests))
        return [_clean(a, r.text) for a, r in zip(answers, requests)]

    def _key(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"messages": messages, "model": self.model, "seed": self.seed}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()

    def _one(self, request: Request) -> str:
        messages = chat_messages(request)
        path = self.cache_dir / (key := self._key(messages))[:2] / f"{key}.json"
        if path.is_file():
            with self._count:
                self.hits += 1
            return str(json.loads(path.read_text(encoding="utf-8"))["text"])
        with self._in_flight:
            text = self._post(messages)
        with self._count:
            self.misses += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(path, {"model": self.model, "seed": self.seed, "messages": messages, "text": text})
        return text

    def _post(self, messages: list[dict[str, str]]) -> str:
        payload = {"model": self.model, "messages": messages, "temperature": self.spec.temperature,
                   "seed": self.seed, "max_tokens": self.spec.max_tokens}
        headers = {"Content-Type": "application/json"}
        if self.spec.api_key_env and os.environ.get(self.spec.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.spec.api_key_env]}"
        url = self.spec.url.rstrip("/") + "/chat/completions"
        last = ""
        for attempt in range(self.spec.retries + 1):
            if attempt:
                time.sleep(min(2 ** attempt * 0.5, 30))
            request = urllib.request.Request(url, json.dumps(payload).encode(), headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.spec.timeout_seconds) as response:
                    return _answer_text(json.loads(response.read()), url)
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {exc.read()[:200].decode(errors='replace')}"
                if exc.code not in RETRYABLE:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = str(getattr(exc, "reason", exc))
            log.warning("augment llm request to %s failed (%s), attempt %d of %d", url, last, attempt + 1,
                        self.spec.retries + 1)
        raise StageFailed(f"augment.llm: {url} did not answer ({last}); start the server (e.g. 'ollama serve' or "
                          "llama.cpp's server), fix augment.llm.url / model, or set augment.backend: rules. "
                          "Retry the job: rows done so far are kept")


def _answer_text(body: Any, url: str) -> str:
    try:
        return str(body["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        raise StageFailed(f"augment.llm: {url} answered without choices[0].message.content; is it an "
                          "OpenAI-compatible chat endpoint?") from None


def _clean(answer: str, original: str) -> str | None:
    """The rewritten reply without wrapping quotes; None when empty or unchanged (nothing to learn)."""
    text = answer.strip().strip('"').strip()
    return text if text and text != original.strip() else None
