"""Write a merged HF checkpoint as one GGUF file with the ``gguf`` package, streaming tensor by tensor.

Tensor infos are planned from the safetensors headers alone, so the header is written first and then each
tensor is read (memory-mapped), converted and written once: peak memory is one tensor, not the model.
Type rules follow llama.cpp's converter: 1-D tensors, norms and biases stay F32; quantized types fall back
to F16 for rows that are not a whole number of blocks.
"""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from handlers.export import gguf_arch
from handlers.export.tensor_stream import TensorStream
from handlers.export.tokenizer_meta import TokenizerMeta, add_tokenizer_to_writer
from trainbox.errors import StageFailed

log = logging.getLogger(__name__)

# job key -> (tensor type name, llama.cpp file type name)
OUT_TYPES = {"f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
             "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # logical shape, numpy order
    qtype: str  # GGMLQuantizationType name
    nbytes: int
    load: Callable[[int], np.ndarray] = field(repr=False)  # slot -> data (valid until that slot is reused)


@dataclass
class GGUFResult:
    path: Path
    out_type: str
    tensors: list[tuple[str, tuple[int, ...], str]]  # what the verifier expects to read back
    seconds: float
    size_bytes: int
    fallbacks: list[str]


def choose_qtype(name: str, shape: tuple[int, ...], out_type: str, tied: bool) -> str:
    """Tensor type for one tensor in an ``out_type`` file (llama.cpp's rules)."""
    import gguf

    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return "F32"
    qtype = OUT_TYPES[out_type][0]
    # gguf-py has no Q6_K; llama.cpp keeps the output projection at a higher precision in small quants
    if qtype == "Q4_0" and (name == "output.weight" or (tied and name == "token_embd.weight")):
        qtype = "Q8_0"
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    if shape[-1] % block:
        return "F16"
    return qtype


def _nbytes(shape: tuple[int, ...], qtype: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return int(np.prod(shape)) // block * size


def _convert(stream: TensorStream, src: Any, qtype: str, permute_heads: int | None, slot: int) -> np.ndarray:
    """Stored tensor -> the bytes (as an array) of one GGUF tensor of ``qtype``, built in reused buffers.

    Llama's Q/K permutation is folded into the same copy that converts the dtype.
    """
    import gguf
    import torch

    stored_shape = shape = tuple(src.shape)
    if permute_heads:
        rest = shape[1:]
        half = shape[0] // permute_heads // 2
        src = src.reshape(permute_heads, 2, half, *rest).transpose(1, 2)
        shape = (permute_heads, half, 2, *rest)
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(qtype, torch.float32)
    out = stream.scratch(int(np.prod(shape)), dtype, slot).view(shape)
    out.copy_(src)
    if qtype == "BF16":  # torch rounds to nearest even, like ggml
        return out.view(torch.int16).numpy().view(np.uint8)
    if qtype in ("F16", "F32"):
        return out.numpy()
    return gguf.quants.quantize(out.reshape(stored_shape).numpy(), gguf.GGMLQuantizationType[qtype])


def plan_tensors(spec: gguf_arch.ArchSpec, source: TensorStream, out_type: str) -> tuple[list[PlannedTensor], list[str]]:
    """Every tensor of the file, in write order, with its type and size; and the F16 fallbacks taken."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.gguf_arch.upper()],
                                        int(spec.config["num_hidden_layers"]))
    planned: list[PlannedTensor] = []
    fallbacks: list[str] = []
    for name, data in gguf_arch.extra_tensors(spec):
        planned.append(PlannedTensor(name, data.shape, "F32", data.nbytes, lambda _slot, d=data: d))
    for hf_name in source.names():
        new = gguf_arch.gguf_name(spec, name_map, hf_name)
        if new is None:
            continue
        shape = source.shape(hf_name)
        qtype = choose_qtype(new, shape, out_type, spec.tied)
        if qtype == "F16" and OUT_TYPES[out_type][0] not in ("F16",) and len(shape) > 1:
            fallbacks.append(new)

        def load(slot: int, hf_name: str = hf_name, qtype: str = qtype) -> np.ndarray:
            return _convert(source, source.load(hf_name, slot), qtype, gguf_arch.permute_heads(spec, hf_name), slot)

        planned.append(PlannedTensor(new, shape, qtype, _nbytes(shape, qtype), load))
    return planned, fallbacks


def _new_writer(arch: str) -> Any:
    """A ``gguf.GGUFWriter`` that packs long metadata arrays (tokens, scores, types, merges) in bulk.

    The stock writer packs them item by item (about 2 us each): 0.6 s for a 150k-token vocabulary and its
    merges, more than writing a small model's weights. Output bytes are identical.
    """
    import struct

    import gguf

    vt = gguf.GGUFValueType
    numeric = {vt.INT32: "<i4", vt.UINT32: "<u4", vt.FLOAT32: "<f4"}

    class BulkArrayWriter(gguf.GGUFWriter):
        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if (vtype != vt.ARRAY or self.endianess != gguf.GGUFEndian.LITTLE
                    or not isinstance(val, (list, tuple)) or not val):
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            ltype = sub_type if sub_type is not None else vt.get_type(val[0])
            if ltype == vt.STRING:
                items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val]
                body = b"".join(struct.pack("<Q", len(b)) + b for b in items)
            elif ltype in numeric:
                body = np.asarray(val, dtype=numeric[ltype]).tobytes()
            else:
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            head = struct.pack("<I", vtype) if add_vtype else b""
            return head + struct.pack("<IQ", ltype, len(val)) + body

    return BulkArrayWriter(path=None, arch=arch)


@contextmanager
def _conversion_threads() -> Iterator[None]:
    """Few torch threads while converting: the writer thread needs a core, and an oversubscribed OpenMP pool
    made conversion 3-6x slower on a busy 2-core machine (bench/export_bench.py)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(4, (os.cpu_count() or 2) // 2)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_pipelined(writer: Any, planned: list[PlannedTensor],
                     on_tensor: Callable[[int, int], None] | None) -> None:
    """Convert tensor i+1 (buffer slot (i+1) % 2) while a worker thread writes tensor i (slot i % 2).

    Both sides release the GIL (torch copy, file write), so on two cores conversion hides behind I/O.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gguf-write") as pool:
        pending: Future[None] | None = None
        for i, t in enumerate(planned):
            data = t.load(i % 2)  # the slot the write before last used, which has finished
            if data.nbytes != t.nbytes:
                raise StageFailed(f"{t.name}: converted to {data.nbytes} bytes, planned {t.nbytes} (a bug)")
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.write_tensor_data, data)
            if on_tensor is not None:
                on_tensor(i + 1, len(planned))
        if pending is not None:
            pending.result()


# llama.cpp gives Phi-3 vocabularies their tokenizer behaviour (special tokens swallow the whitespace after them,
# as the HF tokenizer's rstrip does) only when general.name contains "phi3" or "phi-3", and then it looks these
# tokens up and refuses the file if one is missing (src/llama-vocab.cpp)
PHI3_MARKER = "phi3"
PHI3_MODE_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")


def general_name(name: str, gguf_arch: str, tokens: list[str]) -> str:
    """general.name: the model's name, carrying "phi3" for a Phi-3 vocabulary so llama.cpp tokenizes like HF."""
    if gguf_arch != "phi3" or any(m in name.lower() for m in ("phi3", "phi-3")):
        return name
    if not set(PHI3_MODE_TOKENS) <= set(tokens):
        return name  # llama.cpp could not load it in Phi-3 mode; the verifier reports any tokenization difference
    return f"{name} ({PHI3_MARKER})"


def _write_general(writer: Any, name: str, gguf_arch: str, base_model: str | None,
                   planned: list[PlannedTensor], tokens: list[str]) -> None:
    """general.* as convert_hf_to_gguf.py writes them: name, basename of the base model's id, size label."""
    import gguf
    from gguf.metadata import Metadata

    writer.add_name(general_name(name, gguf_arch, tokens))
    if base_model:
        model_id = base_model if base_model.count("/") == 1 and not Path(base_model).exists() else Path(base_model).name
        basename = Metadata.get_model_id_components(model_id)[2]
        if basename:
            writer.add_basename(basename)
    total = sum(int(np.prod(t.shape)) for t in planned)
    writer.add_size_label(gguf.size_label(total, 0, 0, 0))


def write_gguf(model_dir: Path, out_path: Path, out_type: str, meta: TokenizerMeta, *, name: str,
               config: dict[str, Any] | None = None, on_tensor: Callable[[int, int], None] | None = None,
               base_model: str | None = None) -> GGUFResult:
    """Write ``model_dir`` (a merged save_pretrained folder) as ``out_path`` of ``out_type``; atomic rename.

    ``base_model``: the hub id or folder the model was fine-tuned from (general.basename, as llama.cpp's
    converter derives it)."""
    import gguf

    if out_type not in OUT_TYPES:
        raise StageFailed(f"export.gguf: unknown type {out_type!r}; use one of {', '.join(OUT_TYPES)}")
    start = time.perf_counter()
    config = config or json.loads((Path(model_dir) / "config.json").read_text())
    spec = gguf_arch.arch_spec(config)
    if len(meta.tokens) != int(config["vocab_size"]):
        raise StageFailed(f"tokenizer metadata has {len(meta.tokens)} tokens, the model {config['vocab_size']}")
    out_path = Path(out_path)
    part = out_path.with_name(out_path.name + ".part")
    with ExitStack() as stack:
        source = TensorStream(Path(model_dir), stack)
        planned, fallbacks = plan_tensors(spec, source, out_type)
        writer = _new_writer(spec.gguf_arch)
        writer.add_type(gguf.GGUFType.MODEL)
        _write_general(writer, name, spec.gguf_arch, base_model, planned, meta.tokens)
        writer.add_file_type(int(gguf.LlamaFileType[OUT_TYPES[out_type][1]]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        gguf_arch.write_hparams(writer, spec)
        if (attn_factor := gguf_arch.longrope_attn_factor(spec)) is not None:
            writer.add_rope_scaling_attn_factors(attn_factor)
        add_tokenizer_to_writer(writer, meta)
        for t in planned:
            qtype = gguf.GGMLQuantizationType[t.qtype]
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=qtype)
        writer.write_header_to_file(path=part)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with _conversion_threads():
            _write_pipelined(writer, planned, on_tensor)
        writer.close()
    with open(part, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(part, out_path)
    seconds = time.perf_counter() - start
    log.info("wrote %s (%s, %d tensors, %.1f MB) in %.2f s", out_path.name, out_type, len(planned),
             out_path.stat().st_size / 1e6, seconds)
    return GGUFResult(out_path, out_type, [(t.name, tuple(t.shape), t.qtype) for t in planned], seconds,
                      out_path.stat().st_size, fallbacks)
