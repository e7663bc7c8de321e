"""Duplicate removal for generated rows: exact by normalised hash of the whole row, near by MinHash LSH over its
word shingles, and by embedding cosine of the replies of rows with the same prompt (the same answer reworded)."""
from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import numpy as np
from datasketch import MinHash, MinHashLSH

NUM_PERM = 64
JACCARD = 0.85


def normalised_hash(text: str) -> str:
    """Case, whitespace and punctuation do not make a row new."""
    words = re.findall(r"\w+", text.lower())
    return hashlib.sha256(" ".join(words).encode()).hexdigest()


def _minhash(text: str) -> MinHash:
    words = re.findall(r"\w+", text.lower())
    shingles = {" ".join(words[i:i + 3]) for i in range(max(1, len(words) - 2))}
    mh = MinHash(num_perm=NUM_PERM, seed=1)
    for s in sorted(shingles):
        mh.update(s.encode())
    return mh


class Deduplicator:
    """Keeps the first of each group of duplicates, in the order rows are offered."""

    def __init__(self, cosine: float):
        self.cosine = cosine
        self.hashes: set[str] = set()
        self.lsh = MinHashLSH(threshold=JACCARD, num_perm=NUM_PERM)
        self.replies: dict[str, list[np.ndarray]] = defaultdict(list)  # prompt hash -> kept reply embeddings
        self.exact = self.near = 0

    def offer(self, key: str, text: str, prompt: str, reply_embedding: np.ndarray | None) -> bool:
        """True (and remembered) when the row (``text`` whole, ``prompt`` its turns before the reply) duplicates
        nothing kept so far."""
        digest = normalised_hash(text)
        if digest in self.hashes:
            self.exact += 1
            return False
        mh = _minhash(text)
        same_prompt = self.replies[normalised_hash(prompt)]
        if self.lsh.query(mh) or (reply_embedding is not None and same_prompt and
                                  float(np.max(np.stack(same_prompt) @ reply_embedding)) >= self.cosine):
            self.near += 1
            return False
        self.hashes.add(digest)
        self.lsh.insert(key, mh)
        if reply_embedding is not None:
            same_prompt.append(reply_embedding)
        return True
