"""Ollama Modelfile: FROM the GGUF, a TEMPLATE translated from the chat template, stop words, optional SYSTEM.

The translation renders the model's own chat template (Jinja, or trainbox's default headers) with marker
contents and reads each role's prefix and suffix off the result, then rebuilds the same text as a Go
template; ``Translation.render`` re-creates a conversation from those pieces so the result can be checked.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainbox.errors import StageFailed
from trainbox.preflight import modelfile_unprintable, modelfile_value_problem

log = logging.getLogger(__name__)

API = "http://127.0.0.1:11434"
Render = Callable[[list[dict[str, str]], bool], str]
_MARK = {"system": "QXSYSTEMQX", "user": "QXUSERQX", "user2": "QXUSERTWOQX", "assistant": "QXASSISTANTQX"}


@dataclass
class Translation:
    """Role wrappers of a chat format, enough to rebuild it as an Ollama TEMPLATE."""

    family: str
    bos: str
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str
    system: tuple[str, str] | None
    warnings: list[str] = field(default_factory=list)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The text Ollama builds from the TEMPLATE (used to check the translation)."""
        out = self.bos
        for m in messages:
            pre, suf = {"system": self.system or ("", ""), "user": self.user, "assistant": self.assistant}[m["role"]]
            out += pre + m["content"] + suf
        return out + self.generation

    def go_template(self) -> str:
        def lit(s: str) -> str:
            return go_literal(s.replace("{{", '{{ "{{" }}'))

        sys_part = ""
        if self.system is not None:
            sys_part = f"{{{{ if .System }}}}{lit(self.system[0])}{{{{ .System }}}}{lit(self.system[1])}{{{{ end }}}}"
        return (f"{lit(self.bos)}{sys_part}{{{{ range .Messages }}}}"
                f"{{{{ if eq .Role \"user\" }}}}{lit(self.user[0])}{{{{ .Content }}}}{lit(self.user[1])}"
                f"{{{{ else if eq .Role \"assistant\" }}}}{lit(self.assistant[0])}{{{{ .Content }}}}"
                f"{lit(self.assistant[1])}{{{{ end }}}}{{{{ end }}}}{lit(self.generation)}")

    def stops(self, eos: str | None) -> list[str]:
        found = [eos or "", self.assistant[1].strip(), self.user[0].strip(), self.user[1].strip()]
        return list(dict.fromkeys(s for s in found if s))


class UnsafeModelfileValue(StageFailed):
    """A value that Ollama's Modelfile parser would not read back as written (it has no escape sequences)."""


def go_literal(text: str) -> str:
    """Template text that Ollama reads back unchanged: a triple quote and unprintable characters become Go
    string constants, since the Modelfile itself has no escapes and ends a TEMPLATE at the first triple quote."""
    out = text.replace('"""', '{{ "\\"\\"\\"" }}')
    for code in modelfile_unprintable(out):
        c = chr(int(code[2:], 16))
        out = out.replace(c, '{{ "\\U%08X" }}' % ord(c))
    return out


def quoted(value: str, field: str, triple: bool = False) -> str:
    """``value`` as one Modelfile argument that Ollama's parser reads back unchanged, or UnsafeModelfileValue.

    The parser has no escapes: a ``"`` value ends at a quote followed by a space or newline, a triple-quoted one
    at ``\"\"\"``, and unprintable characters vanish. Either form is chosen where it is exact; else refused."""
    problem = modelfile_value_problem(value, field)
    if problem:
        raise UnsafeModelfileValue(f"{field} {problem.message}; {problem.fix}")
    if not triple and '"' not in value:
        return f'"{value}"'
    return f'"""{value}"""'


def family_of(template: str | None) -> str:
    if not template:
        return "trainbox-default"
    for marker, name in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("[INST]", "mistral"),
                         ("<start_of_turn>", "gemma"), ("<|user|>", "phi3")):
        if marker in template:
            return name
    return "custom"


def _split(text: str, marker: str) -> tuple[str, str]:
    if marker not in text:
        raise ValueError(f"the chat template drops message content ({marker})")
    head, tail = text.split(marker, 1)
    return head, tail


def translate(render: Render, template: str | None, bos: str | None, add_bos: bool) -> Translation:
    """Read role wrappers off ``render`` (the tokenizer's chat formatting) for user/assistant/system."""
    from jinja2 import TemplateError

    u, a, u2 = _MARK["user"], _MARK["assistant"], _MARK["user2"]
    convo = [{"role": "user", "content": u}, {"role": "assistant", "content": a}, {"role": "user", "content": u2}]
    with_gen, without_gen = render(convo, True), render(convo, False)
    p0, rest = _split(with_gen, u)
    m1, rest = _split(rest, a)
    m2, gen_tail = _split(rest, u2)
    lead = bos if bos and p0.startswith(bos) else ""
    user_pre = p0[len(lead):]
    asst_suf = m2[: len(m2) - len(user_pre)] if m2.endswith(user_pre) else None
    if asst_suf is None:
        raise ValueError("the chat template's turns are not a fixed prefix/suffix per role")
    # the user turn's end: what follows the last user turn without a generation prompt, unless the template
    # adds more there (Phi-3 appends eos); else the assistant turn's end, the usual case; else the common part
    user_suf = next((c for c in (_split(without_gen, u2)[1], asst_suf)
                     if m1.startswith(c) and gen_tail.startswith(c)), os.path.commonprefix([m1, gen_tail]))
    family = family_of(template)
    if family == "custom":  # e.g. "<|{{ role }}|>": recognise the rendered markers instead
        family = family_of(with_gen)
    t = Translation(family, "" if add_bos else lead, (user_pre, user_suf), (m1[len(user_suf):], asst_suf),
                    gen_tail[len(user_suf):], None)
    try:
        s = _MARK["system"]
        ps, rest = _split(render([{"role": "system", "content": s}, {"role": "user", "content": u}], False), s)
        ms = _split(rest, u)[0]
        if ps.startswith(lead) and ms.endswith(user_pre):
            t.system = (ps[len(lead):], ms[: len(ms) - len(user_pre)])
    except (ValueError, TemplateError) as exc:  # the template refuses a system turn: reported, not fatal
        t.warnings.append(f"the chat template rejects a system message ({type(exc).__name__}); SYSTEM is left out")
    if t.system is None and not t.warnings:
        t.warnings.append("the chat template folds the system message into a user turn; SYSTEM is left out")
    return t


_SAFE_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.gguf")
_ARGUMENT = re.compile(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER stop) ("""[\s\S]*?"""|"[^"]*"|\S+)(?=[ \t]*(?:\n|$))', re.M)


def modelfile_text(gguf_name: str, t: Translation, eos: str | None, system: str | None) -> str:
    """The Modelfile; every value is quoted so that Ollama reads it back as written (or the stage fails)."""
    if not _SAFE_FILE.fullmatch(gguf_name):
        raise UnsafeModelfileValue(f"GGUF file name {gguf_name!r} cannot be a relative FROM path in a Modelfile")
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {quoted(t.go_template(), 'the chat template', triple=True)}"]
    lines += [f"PARAMETER stop {quoted(s, 'a stop word of the chat template')}" for s in t.stops(eos)]
    if system and t.system is not None:
        lines.append(f"SYSTEM {quoted(system, 'export.ollama.system', triple=True)}")
    return "\n".join(lines) + "\n"


def read_modelfile(text: str) -> dict[str, Any]:
    """FROM, TEMPLATE, SYSTEM and stop words of a Modelfile written by ``modelfile_text``."""
    out: dict[str, Any] = {"stop": []}
    for key, value in _ARGUMENT.findall(text):
        if value.startswith('"""'):
            value = value[3:-3]
        elif value.startswith('"'):
            value = value[1:-1]
        if key == "PARAMETER stop":
            out["stop"].append(value)
        else:
            out[key.lower()] = value
    return out


def ollama_name(job_name: str, version: int) -> str:
    return f"{job_name.lower()}:v{version}"


def create_command(name: str) -> str:
    return f"cd <model folder> && ollama create {name} -f Modelfile"


def _api_up() -> bool:
    try:
        with urllib.request.urlopen(f"{API}/api/version", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def ollama_reachable() -> str | None:
    """'cli' when the ollama command is on PATH, 'api' when only its server answers, else None."""
    if shutil.which("ollama"):
        return "cli"
    return "api" if _api_up() else None


def create_and_smoke(model_dir: Path, name: str, how: str, prompt: str = "Hello") -> dict[str, Any]:
    """``ollama create`` from the Modelfile, then one short generation; returns status and the reply."""
    if how == "cli":
        create = subprocess.run(["ollama", "create", name, "-f", "Modelfile"], cwd=model_dir,
                                capture_output=True, text=True, timeout=600)
        if create.returncode != 0:
            return {"status": "create_failed", "error": (create.stderr or create.stdout)[-2000:]}
        run = subprocess.run(["ollama", "run", name, prompt], capture_output=True, text=True, timeout=300)
        ok = run.returncode == 0
        return {"status": "created" if ok else "smoke_failed", "reply": run.stdout[-500:],
                **({} if ok else {"error": run.stderr[-2000:]})}
    return _create_via_api(model_dir, name, prompt)


def _post(path: str, body: Any, timeout: float = 600, length: int | None = None) -> dict[str, Any]:
    headers = {"Content-Length": str(length)} if length is not None else {}
    req = urllib.request.Request(f"{API}{path}", data=body, method="POST", headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        text = resp.read().decode("utf-8", "replace").strip().splitlines()
    return json.loads(text[-1]) if text else {}


def _create_via_api(model_dir: Path, name: str, prompt: str) -> dict[str, Any]:
    import hashlib

    modelfile = read_modelfile((model_dir / "Modelfile").read_text(encoding="utf-8"))
    gguf_name = modelfile["from"].removeprefix("./")
    path = model_dir / gguf_name
    sha = hashlib.sha256()
    with open(path, "rb") as fh:  # streamed: the file may be many GB
        while chunk := fh.read(16 << 20):
            sha.update(chunk)
    digest = sha.hexdigest()
    try:
        with open(path, "rb") as fh:
            _post(f"/api/blobs/sha256:{digest}", fh, length=path.stat().st_size)
        body: dict[str, Any] = {"model": name, "files": {gguf_name: f"sha256:{digest}"},
                                "template": modelfile["template"], "parameters": {"stop": modelfile["stop"]}}
        if "system" in modelfile:
            body["system"] = modelfile["system"]
        _post("/api/create", json.dumps(body).encode())
        reply = _post("/api/generate", json.dumps({"model": name, "prompt": prompt, "stream": False,
                                                   "options": {"num_predict": 16}}).encode(), timeout=300)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"status": "create_failed", "error": f"{type(exc).__name__}: {exc}"}
    return {"status": "created", "reply": str(reply.get("response", ""))[-500:]}
