"""Run llama.cpp (llama-cpp-python) on one GGUF file in a child process with a time limit.

llama.cpp is native code that can crash or hang on some machines (its AMX kernels, picked for Q8_0 weights
by builds made with ``-march=native`` on Intel Xeon CPUs with AMX, die with SIGSEGV), and a crash must not take
the export stage or the test runner with it. The parent side (``run_in_child``) only uses the standard
library; this file is also the child's script (``python llama_cpp_check.py REQUEST RESULT``), which imports
nothing of trainbox, so the child starts fast and never loads torch.

The child tokenizes every case with llama.cpp's own BOS handling and special tokens parsed (as Ollama and
``llama-cli`` do) and, where asked, greedy-decodes from those tokens.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TIMEOUT_SECONDS = 300.0
# Test hook: "<SIGNAME or hang>[@extra]:<part of the file name>" makes the child fail that way on matching files
# (with "@extra" only while llama.cpp's extra CPU buffer types are on, like the AMX crash)
FAULT_ENV = "TRAINBOX_TEST_LLAMA_CPP_FAULT"
PHASE = "PHASE "
NATIVE_CRASH_ADVICE = (
    "llama.cpp itself crashed, so the file could not be checked on this machine. On Intel Xeon CPUs with AMX "
    "(grep amx /proc/cpuinfo) llama-cpp-python built with -march=native runs Q8_0 weights through its AMX "
    "kernels, which crash there; rebuild it without them: CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install "
    "--force-reinstall --no-cache-dir llama-cpp-python (see docs/export.md), or drop this type from export.gguf")
HANG_ADVICE = ("llama.cpp did not finish in time; on a busy or slow machine retry the job, otherwise report it "
               "with this file and the llama-cpp-python version")


def available() -> bool:
    """Whether llama-cpp-python is installed (found without importing it into this process)."""
    return importlib.util.find_spec("llama_cpp") is not None


def _text(data: str | bytes | None) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else (data or "")


def _last_phase(stdout: str) -> str:
    phases = [line[len(PHASE):] for line in stdout.splitlines() if line.startswith(PHASE)]
    return phases[-1] if phases else "starting"


def _tail(stderr: str, lines: int = 8) -> str:
    return "\n".join(line for line in stderr.strip().splitlines()[-lines:])


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def run_in_child(gguf: Path, cases: list[dict[str, Any]], timeout: float = TIMEOUT_SECONDS,
                 no_extra_bufts: bool = False) -> dict[str, Any]:
    """Results of ``cases`` (``{"text", "generate"}``, optionally ``"add_special"``/``"parse_special"``: False
    to tokenize raw text without BOS or special-token parsing) on ``gguf``, or a plain failure: ``{"crashed": reason,
    "signal"|"timeout_seconds", "check"}`` when llama.cpp died or hung, ``{"error": reason}`` when it refused
    the file. Success: ``{"cases": [{"ids", "generated"}]}``. ``no_extra_bufts``: load with llama.cpp's extra CPU
    buffer types off (``use_extra_bufts = false``, ``llama-cli --no-repack``), which keeps weights out of the AMX
    and repacked kernels."""
    gguf = Path(gguf)
    with tempfile.TemporaryDirectory(prefix="trainbox-llama-cpp-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"gguf": str(gguf), "cases": cases, "no_extra_bufts": no_extra_bufts}),
                           encoding="utf-8")
        # -I: only the standard library and site-packages, not this folder's modules or PYTHONPATH
        cmd = [sys.executable, "-I", str(Path(__file__).resolve()), str(request), str(result)]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:  # subprocess.run has killed the child
            check = _last_phase(_text(exc.stdout))
            return {"crashed": f"{gguf.name}: llama.cpp hung in the check '{check}' and was stopped after "
                               f"{timeout:.0f} s; {HANG_ADVICE}", "timeout_seconds": timeout, "check": check}
        stdout, stderr = _text(proc.stdout), _text(proc.stderr)
        check = _last_phase(stdout)
        if proc.returncode < 0:
            name = _signal_name(proc.returncode)
            tail = _tail(stderr)
            return {"crashed": f"{gguf.name}: llama.cpp was killed by {name} in the check '{check}'"
                               + (f" (its last output: {tail})" if tail else "") + f". {NATIVE_CRASH_ADVICE}",
                    "signal": name, "check": check}
        if proc.returncode != 0 or not result.is_file():
            return {"error": f"{gguf.name}: the llama.cpp check exited with code {proc.returncode} in "
                             f"'{check}': {_tail(stderr) or 'no output'}"}
        return json.loads(result.read_text(encoding="utf-8"))


def _phase(name: str) -> None:
    sys.stdout.write(PHASE + name + "\n")
    sys.stdout.flush()


def _maybe_fault(gguf: str, extra_bufts: bool) -> None:
    """The test hook (see FAULT_ENV): fail like a native crash or a hang, on matching files only."""
    how, _, part = os.environ.get(FAULT_ENV, "").partition(":")
    how, _, only_extra = how.partition("@")
    if not how or part not in Path(gguf).name or (only_extra and not extra_bufts):
        return
    if how == "hang":
        time.sleep(3600)
    os.kill(os.getpid(), getattr(signal, how))


def _child(request_path: str, result_path: str) -> int:
    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    _phase("load")
    import llama_cpp.llama_cpp as low_level
    from llama_cpp import Llama

    if request.get("no_extra_bufts"):  # Llama() takes its model parameters from this function
        defaults = low_level.llama_model_default_params

        def without_extra_bufts() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        low_level.llama_model_default_params = without_extra_bufts

    try:
        llm = Llama(model_path=request["gguf"], n_ctx=1024, n_threads=2, verbose=False, logits_all=False)
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
        out = {"error": f"llama.cpp cannot load {Path(request['gguf']).name}: {exc}"}
        Path(result_path).write_text(json.dumps(out), encoding="utf-8")
        return 0
    results = []
    for i, case in enumerate(request["cases"]):
        _phase(f"tokenize prompt {i + 1}")
        # add_bos=True lets llama.cpp add BOS as the GGUF says (add_bos_token), as Ollama and llama-cli do
        ids = llm.tokenize(case["text"].encode("utf-8"), add_bos=case.get("add_special", True),
                           special=case.get("parse_special", True))
        generated: list[int] = []
        if case.get("generate"):
            _phase(f"generate from prompt {i + 1}")
            _maybe_fault(request["gguf"], not request.get("no_extra_bufts"))
            llm.reset()
            for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
                generated.append(int(tok))
                if len(generated) >= int(case["generate"]):
                    break
        results.append({"ids": [int(t) for t in ids], "generated": generated})
    Path(result_path).write_text(json.dumps({"cases": results}), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2]))
