"""Modelfile per chat-template family: the TEMPLATE rebuilds exactly what the chat template renders."""
from __future__ import annotations

import pytest

import export_fixtures as F
from handlers import modelio
from handlers.export import ollama

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
          "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
ZEPHYR = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + "
          "eos_token }}{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token }}"
          "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}"
          "{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}")
# the chat templates of microsoft/Phi-3-mini-4k-instruct and TinyLlama/TinyLlama-1.1B-Chat-v1.0, verbatim
PHI3_MINI = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
             "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
             "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
             "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
             "{% endif %}")
TINYLLAMA = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] "
             "+ eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + "
             "eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + "
             "eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n"
             "{% endif %}\n{% endfor %}")
CASES = {  # name -> (template, family, has system, stops)
    "chatml": (F.CHATML_TEMPLATE, "chatml", True, ["<|end|>", "<|im_end|>", "<|im_start|>user"]),
    "llama3": (LLAMA3, "llama3", True, ["<|end|>", "<|eot_id|>", "<|start_header_id|>user<|end_header_id|>"]),
    "phi3": (modelio.TINY_CHAT_TEMPLATE, "phi3", True, ["<|end|>", "<|user|>"]),
    "mistral": (MISTRAL, "mistral", False, ["<|end|>", "[INST]", "[/INST]"]),
    "zephyr": (ZEPHYR, "phi3", True, ["<|end|>", "<|user|>"]),
    "phi3-mini": (PHI3_MINI, "phi3", True, ["<|end|>", "<|user|>"]),
    "tinyllama-chat": (TINYLLAMA, "phi3", True, ["<|end|>", "<|user|>"]),
    "trainbox-default": (None, "trainbox-default", True, ["<|end|>", "### User:"]),
}
CONVO = [{"role": "user", "content": "Is the sky blue?"}, {"role": "assistant", "content": "Yes."},
         {"role": "user", "content": "Why?"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return modelio.load_tokenizer(modelio.build_tiny_model(tmp_path_factory.mktemp("tiny")))


def _translate(tokenizer, template):
    tokenizer.chat_template = template
    return ollama.translate(lambda m, g: modelio.render_chat(tokenizer, m, add_generation_prompt=g), template,
                            tokenizer.bos_token, add_bos=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_template_rebuilds_the_chat_template(tokenizer, case):
    template, family, has_system, stops = CASES[case]
    t = _translate(tokenizer, template)
    assert t.family == family
    assert t.render(CONVO) == modelio.render_chat(tokenizer, CONVO, add_generation_prompt=True)
    assert (t.system is not None) is has_system
    if has_system:
        convo = [{"role": "system", "content": "Be brief."}, *CONVO]
        assert t.render(convo) == modelio.render_chat(tokenizer, convo, add_generation_prompt=True)
    else:
        assert t.warnings and "SYSTEM is left out" in t.warnings[0]
    assert t.stops(tokenizer.eos_token) == stops


def test_chatml_modelfile_text(tokenizer):
    t = _translate(tokenizer, F.CHATML_TEMPLATE)
    text = ollama.modelfile_text("m-q8_0.gguf", t, "<|im_end|>", "You are terse.")
    assert text == (
        "FROM ./m-q8_0.gguf\n"
        'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
        '{{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}'
        '<|im_start|>assistant\n"""\n'
        'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>user"\n'
        'SYSTEM """You are terse."""\n')


def test_bos_is_written_only_when_llama_cpp_does_not_add_it(tokenizer):
    tokenizer.chat_template = modelio.TINY_CHAT_TEMPLATE
    render = lambda m, g: modelio.render_chat(tokenizer, m, add_generation_prompt=g)  # noqa: E731
    assert ollama.translate(render, modelio.TINY_CHAT_TEMPLATE, "<|bos|>", add_bos=False).go_template().startswith(
        "<|bos|>{{ if .System }}")
    assert ollama.translate(render, modelio.TINY_CHAT_TEMPLATE, "<|bos|>", add_bos=True).go_template().startswith(
        "{{ if .System }}")


def test_no_system_line_when_the_template_cannot_hold_one(tokenizer):
    t = _translate(tokenizer, MISTRAL)
    assert "SYSTEM" not in ollama.modelfile_text("m.gguf", t, "</s>", "You are terse.")


def test_ollama_cli_is_driven_from_the_model_folder(tmp_path, monkeypatch):
    """A stand-in ``ollama`` on PATH records how it is called: create from the Modelfile, then one prompt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    script = bin_dir / "ollama"
    script.write_text(f'#!/bin/sh\necho "$PWD|$*" >> {log}\n[ "$1" = run ] && echo "Hi there"\nexit 0\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "Modelfile").write_text("FROM ./m.gguf\n")
    assert ollama.ollama_reachable() == "cli"
    info = ollama.create_and_smoke(model_dir, "job:v2", "cli")
    assert info == {"status": "created", "reply": "Hi there\n"}
    create, run = log.read_text().splitlines()
    assert create == f"{model_dir}|create job:v2 -f Modelfile"
    assert run.endswith("|run job:v2 Hello")


def test_ollama_api_gets_the_blob_then_the_model(tmp_path, monkeypatch):
    """Without the CLI, the GGUF is uploaded as a blob and the model created from the Modelfile's parts."""
    import hashlib
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    calls = []

    class FakeOllama(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            calls.append((self.path, body))
            reply = {"response": "Hi"} if self.path == "/api/generate" else {"status": "success"}
            self.send_response(200)
            self.end_headers()
            self.wfile.write(json.dumps(reply).encode())

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), FakeOllama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(ollama, "API", f"http://127.0.0.1:{server.server_port}")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "m.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 100)
    (model_dir / "Modelfile").write_text('FROM ./m.gguf\nTEMPLATE """{{ .Prompt }}"""\nPARAMETER stop "<|end|>"\n'
                                         'SYSTEM """Be brief."""\n')
    try:
        info = ollama.create_and_smoke(model_dir, "job:v1", "api")
    finally:
        server.shutdown()
    digest = hashlib.sha256((model_dir / "m.gguf").read_bytes()).hexdigest()
    assert info == {"status": "created", "reply": "Hi"}
    assert [c[0] for c in calls] == [f"/api/blobs/sha256:{digest}", "/api/create", "/api/generate"]
    assert calls[0][1] == (model_dir / "m.gguf").read_bytes()
    assert json.loads(calls[1][1]) == {"model": "job:v1", "files": {"m.gguf": f"sha256:{digest}"},
                                       "template": "{{ .Prompt }}", "parameters": {"stop": ["<|end|>"]},
                                       "system": "Be brief."}


def parse_like_ollama(text):
    """(command, argument) pairs as Ollama's Modelfile parser reads them: a Python port of ParseFile in
    ollama/parser/parser.go (no escapes; a value ends at a newline once its quotes are complete; runes that are
    not printable vanish)."""
    nil, name_, value, param, comment = range(5)

    def unquote(s):
        for q in ('"""', '"'):
            if s.startswith(q):
                return (s[len(q):-len(q)], True) if len(s) >= 2 * len(q) and s.endswith(q) else ("", False)
        return s, True

    def step(r, state):
        if state == nil:
            return (comment, None) if r == "#" else (nil, None) if r in " \t\r\n" else (name_, r)
        if state == name_:
            if r.isascii() and r.isalpha():
                return name_, r
            assert r in " \t", "invalid command"
            return value, None
        if state == value:
            return (nil, r) if r in " \t\r\n" else (value, r)
        if state == param:
            if (r.isascii() and r.isalnum()) or r == "_":
                return param, r
            assert r in " \t", "unexpected EOF"
            return value, None
        return (nil, None) if r in "\r\n" else (comment, None)

    commands, state, buf, cmd = [], nil, "", None
    for r in text:
        nxt, keep = step(r, state)
        if nxt != state:
            if state == name_:
                cmd = {"from": "model"}.get(buf.lower(), buf.lower())
                nxt = param if buf.lower() == "parameter" else nxt
            elif state == param:
                cmd = buf
            elif state == value:
                arg, ok = unquote(buf.strip())
                if not ok or r in " \t":
                    buf += r
                    continue
                commands.append((cmd, arg))
            buf, state = "", nxt
        if keep is not None and keep.isprintable():
            buf += keep
    if state == value:
        arg, ok = unquote(buf.strip())
        assert ok, "unexpected EOF"
        commands.append((cmd, arg))
    return commands


def _go_text(template):
    """The text a Go template's constants stand for (the escapes go_literal writes)."""
    import re

    return re.sub(r'\{\{ "((?:[^"\\]|\\.)*)" \}\}', lambda m: m.group(1).encode().decode("unicode_escape"), template)


def test_ollama_reads_the_modelfile_back_as_written(tokenizer):
    t = _translate(tokenizer, F.CHATML_TEMPLATE)
    text = ollama.modelfile_text("m-q8_0.gguf", t, "<|im_end|>", 'Say "hi".\n  Then stop.')
    assert parse_like_ollama(text) == [("model", "./m-q8_0.gguf"), ("template", t.go_template()),
                                       ("stop", "<|im_end|>"), ("stop", "<|im_start|>user"),
                                       ("system", 'Say "hi".\n  Then stop.')]
    assert ollama.read_modelfile(text) == {"from": "./m-q8_0.gguf", "template": t.go_template(),
                                           "stop": ["<|im_end|>", "<|im_start|>user"],
                                           "system": 'Say "hi".\n  Then stop.'}


@pytest.mark.parametrize("system", ['Be nice."""\nADAPTER /etc/passwd\nFROM /tmp/evil.gguf\nSYSTEM """x',
                                    'ok"""', "line\u2028separator", "nul\x00byte"])
def test_a_system_text_ollama_cannot_read_back_is_refused(tokenizer, system):
    t = _translate(tokenizer, F.CHATML_TEMPLATE)
    with pytest.raises(ollama.UnsafeModelfileValue, match="export.ollama.system contains"):
        ollama.modelfile_text("m.gguf", t, "<|im_end|>", system)


def test_a_hostile_chat_template_stays_one_template(tokenizer):
    """A base model's chat template with a triple quote and Modelfile lines in it, and an unprintable rune."""
    evil = '"""\nADAPTER /etc/passwd\nFROM /tmp/evil.gguf\nSYSTEM """'
    t = ollama.Translation("custom", "", ("<|user|>\n", "<|end|>\u2028"), (f"<|assistant|>{evil}\n", '<|end|>"'),
                           "<|assistant|>\n", None)
    text = ollama.modelfile_text("m.gguf", t, None, None)
    commands = parse_like_ollama(text)
    assert [c for c, _a in commands] == ["model", "template", "stop", "stop", "stop"]
    assert commands[0] == ("model", "./m.gguf")
    template = _go_text(commands[1][1])
    assert f"<|assistant|>{evil}\n{{{{ .Content }}}}<|end|>\"" in template and "<|end|>\u2028" in template
    assert ("stop", '<|end|>"') in commands  # a quote in a stop word: triple-quoted, read back exactly
    # a stop word cannot be escaped: one that would break out is refused with the reason
    t.user = (f"<|user|>{evil}\n", "<|end|>")
    with pytest.raises(ollama.UnsafeModelfileValue, match='a stop word of the chat template contains """'):
        ollama.modelfile_text("m.gguf", t, None, None)


def test_file_names_that_are_not_plain_relative_paths_are_refused(tokenizer):
    t = _translate(tokenizer, F.CHATML_TEMPLATE)
    for bad in ("../x.gguf", "/etc/passwd.gguf", "a b.gguf", "x.gguf\nADAPTER /etc/passwd"):
        with pytest.raises(ollama.UnsafeModelfileValue, match="cannot be a relative FROM path"):
            ollama.modelfile_text(bad, t, None, None)
