"""Train settings this machine cannot run, found before anything starts (torch-free: the daemon calls it at ingest)."""
from __future__ import annotations

from trainbox.jobspec import TrainSpec

QLORA_NEEDS_CUDA = (
    "train.method: qlora needs an NVIDIA GPU with CUDA (bitsandbytes {bits}-bit quantization) and none was "
    "found on this machine; fix: set train.method: lora (or auto, which uses LoRA here), or run the job on a "
    "machine with a CUDA GPU")


def check_train_requirements(spec: TrainSpec, cuda_available: bool) -> list[str]:
    """Problems (each with its fix) that make ``spec`` impossible here; empty when it can run."""
    problems: list[str] = []
    if spec.method == "qlora" and not cuda_available:
        problems.append(QLORA_NEEDS_CUDA.format(bits=spec.bits))
    if spec.device.startswith("cuda") and not cuda_available:
        problems.append(f"train.device: {spec.device} but no CUDA GPU was found; fix: set train.device: auto or cpu")
    if spec.precision == "fp16" and not cuda_available:
        problems.append("train.precision: fp16 needs a CUDA GPU (half precision training is unstable on CPU); "
                        "fix: set train.precision: auto (fp32 on CPU) or bf16")
    return problems
