"""Read a safetensors checkpoint tensor by tensor into reused buffers.

Why not mmap or ``safe_open``: every tensor they return is fresh memory, and first-touch page faults cost
more than the conversion itself (measured in bench/export_bench.py). Reading each tensor with ``readinto``
into one buffer and converting into a second reused buffer keeps an F16 export close to a plain file copy.
"""
from __future__ import annotations

import json
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from trainbox.errors import StageFailed

ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


@dataclass
class StoredTensor:
    name: str
    dtype: str  # safetensors dtype code
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in ``file``
    nbytes: int


def read_header(path: Path) -> list[StoredTensor]:
    """The tensors of one safetensors file, in on-disk order."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    base = 8 + size
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in ST_DTYPES:
            raise StageFailed(f"{path.name}: tensor {name} is {info['dtype']}; GGUF export reads float checkpoints "
                              "(dequantize the merged model first)")
        begin, end = info["data_offsets"]
        tensors.append(StoredTensor(name, info["dtype"], tuple(info["shape"]), path, base + begin, end - begin))
    return sorted(tensors, key=lambda t: t.start)


class TensorStream:
    """All tensors of a ``save_pretrained`` folder (single file or sharded), loaded into reused buffers."""

    def __init__(self, model_dir: Path, stack: ExitStack):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
                 else ["model.safetensors"])
        self.tensors: dict[str, StoredTensor] = {}
        self.handles: dict[Path, BinaryIO] = {}
        for fname in files:
            path = model_dir / fname
            if not path.is_file():
                raise StageFailed(f"{path} is missing: the merged model folder is incomplete; rerun the export")
            for t in read_header(path):
                self.tensors[t.name] = t
            self.handles[path] = stack.enter_context(open(path, "rb", buffering=0))
        # two slots, so one tensor converts while the previous one is being written
        self._raw: list[Any] = [None, None]
        self._out: dict[tuple[str, int], Any] = {}

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def load(self, name: str, slot: int = 0) -> Any:
        """A torch view of the stored tensor, valid until the next ``load`` into ``slot`` (buffers are reused)."""
        import torch

        t = self.tensors[name]
        if self._raw[slot] is None or self._raw[slot].numel() < t.nbytes:
            self._raw[slot] = torch.empty(max(t.nbytes, 1 << 20), dtype=torch.uint8)
        view = self._raw[slot][: t.nbytes]
        fh = self.handles[t.file]
        fh.seek(t.start)
        got = fh.readinto(memoryview(view.numpy()))
        if got != t.nbytes:
            raise StageFailed(f"{t.file.name}: tensor {name} is cut short ({got} of {t.nbytes} bytes); "
                              "the merged checkpoint is truncated, rerun the export")
        return view.view(getattr(torch, ST_DTYPES[t.dtype])).view(t.shape)

    def scratch(self, numel: int, dtype: Any, slot: int = 0) -> Any:
        """A reused output buffer of ``numel`` elements of ``dtype`` in ``slot`` (grown on demand)."""
        import torch

        key = (str(dtype), slot)
        buf = self._out.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._out[key] = torch.empty(max(numel, 1 << 18), dtype=dtype)
        return buf[:numel]
