"""Each notification backend for real where this machine has it; skipped, with the reason, where it does not."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import wave
from pathlib import Path

import pytest
import yaml

from daemon.config import NotifyBackendSettings, NotifySettings
from daemon.notify import Note, Notifier
from daemon.notify import audio, desktop
from daemon.notify.backends import deliver

from notify_fixtures import desktop_bus, webhook_server  # noqa: F401 (pytest fixtures)

REPO = Path(__file__).resolve().parents[1]
NOTE = Note("job_succeeded", "job support-bot succeeded", "eval accuracy 0.91, exported v3", {"job_id": "j1"})


@pytest.mark.parametrize("fmt", ["json", "ntfy", "slack"])
def test_webhook_payload_formats(webhook_server, fmt):
    settings = NotifyBackendSettings(webhook_url=f"{webhook_server.url}/trainbox-alerts", webhook_format=fmt)
    assert deliver("webhook", NOTE, settings) == (True, "sent")
    (post,) = webhook_server.posts
    assert post["content_type"] == "application/json"
    body = post["json"]
    if fmt == "json":
        assert post["path"] == "/trainbox-alerts"
        assert body["event"] == "job_succeeded" and body["count"] == 1 and body["data"] == {"job_id": "j1"}
        assert body["title"] == NOTE.title and body["message"] == NOTE.message and body["source"] == "trainbox"
    elif fmt == "ntfy":  # ntfy's JSON publishing: POST to the server root, topic in the body
        assert post["path"] == "/"
        assert body == {"topic": "trainbox-alerts", "title": "trainbox: job support-bot succeeded",
                        "message": NOTE.message, "tags": ["white_check_mark"], "priority": 3}
    else:
        assert post["path"] == "/trainbox-alerts"
        assert body == {"text": f"*trainbox: job support-bot succeeded*\n{NOTE.message}"}


def test_webhook_to_a_closed_port_fails_with_a_reason():
    settings = NotifyBackendSettings(webhook_url="http://127.0.0.1:9/hook", timeout_seconds=2)
    ok, detail = deliver("webhook", NOTE, settings)
    assert not ok and "unreachable" in detail


def test_bundled_sounds_are_short_pcm_wavs():
    for name in ("success.wav", "alert.wav"):
        with wave.open(str(audio.SOUNDS / name)) as w:
            assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
            assert 0.2 < w.getnframes() / w.getframerate() < 1.0
    assert audio.sound_for(NOTE).name == "success.wav"
    assert audio.sound_for(Note("job_failed", "x", "y")).name == "alert.wav"


def _audio_settings(**kw) -> NotifyBackendSettings:
    if not sys.platform.startswith("linux"):
        pytest.skip("the Linux players are exercised here")
    if audio._pulse_running():
        return NotifyBackendSettings(audio=True, **kw)  # a real sound server: play for real
    if not shutil.which("aplay"):
        pytest.skip("no sound server and no aplay here (apt-get install alsa-utils)")
    return NotifyBackendSettings(audio=True, audio_device="null", **kw)  # ALSA's null PCM: decoded, then dropped


def test_audio_backend_plays_the_bundled_sound():
    settings = _audio_settings()
    assert audio.probe(settings)[0]
    t0 = time.perf_counter()
    assert deliver("audio", NOTE, settings) == (True, "sent")
    assert time.perf_counter() - t0 < settings.timeout_seconds


def test_audio_backend_speaks_with_espeak_ng(tmp_path):
    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    settings = _audio_settings(speak=True)
    assert "espeak-ng" in audio.probe(settings)[1]
    assert deliver("audio", NOTE, settings) == (True, "sent")
    wav = tmp_path / "say.wav"  # what the backend synthesises before playing it
    subprocess.run(["espeak-ng", "-w", str(wav), NOTE.sentence()], check=True, timeout=30)
    with wave.open(str(wav)) as w:
        assert w.getnframes() / w.getframerate() > 0.5


def test_audio_without_any_player_is_unavailable_with_a_fix(monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux player detection")
    monkeypatch.setenv("PATH", "/nonexistent")
    ok, reason = audio.probe(NotifyBackendSettings(audio=True))
    assert not ok and "install pulseaudio-utils or alsa-utils" in reason


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="notify-send is the Linux desktop path")
def test_desktop_notification_reaches_the_session_bus(desktop_bus):
    if not shutil.which("notify-send") and desktop._linux_way() is None:
        pytest.skip("neither notify-send nor python-dbus here (apt-get install libnotify-bin)")
    settings = NotifyBackendSettings(desktop=True)
    assert desktop.probe(settings)[0]
    assert deliver("desktop", NOTE, settings) == (True, "sent")
    (got,) = desktop_bus.wait_for(1)
    assert got == {"app": "trainbox", "summary": "trainbox: job support-bot succeeded", "body": NOTE.message}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="notify-send is the Linux desktop path")
def test_notifier_end_to_end_to_the_desktop(desktop_bus, tmp_path):
    if not shutil.which("notify-send") and desktop._linux_way() is None:
        pytest.skip("neither notify-send nor python-dbus here (apt-get install libnotify-bin)")
    notifier = Notifier(NotifySettings(coalesce_seconds=0.05), tmp_path)
    for i in range(20):
        notifier.notify("file_rejected", f"trainbox rejected f{i}.jsonl", "line 1: not valid JSON")
    notifier.close()
    got = desktop_bus.wait_for(1)
    assert len(got) == 1 and got[0]["summary"] == "trainbox: 20 files rejected", got
    assert got[0]["body"] == "latest: trainbox rejected f19.jsonl: line 1: not valid JSON"


def test_notify_test_command_reports_each_backend(tmp_path, webhook_server):
    (tmp_path / "daemon.yaml").write_text(yaml.safe_dump(
        {"notify": {"backends": {"desktop": False, "webhook_url": webhook_server.url + "/t"}}}))
    cmd = [sys.executable, "-m", "daemon.cli", "notify", "test", "--home", str(tmp_path), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"webhook": {"ok": True, "detail": "sent"}}
    assert webhook_server.posts[0]["json"]["title"] == "test notification"

    proc = subprocess.run(cmd[:-1] + ["--backend", "webhook", "--backend", "audio", "--json"], capture_output=True,
                          text=True, cwd=REPO, timeout=60, env={"PATH": "/nonexistent"})
    result = json.loads(proc.stdout)
    assert proc.returncode == 1 and result["webhook"]["ok"] and not result["audio"]["ok"]
    assert "install" in result["audio"]["detail"]


def test_a_job_that_asks_for_speech_is_spoken_though_the_daemon_does_not_speak(tmp_path, monkeypatch):
    """A job's notify.speak reaches the audio backend through the dispatcher; the real espeak-ng runs, behind a
    wrapper on PATH that only records each call."""
    real = shutil.which("espeak-ng")
    if not real:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    backends = _audio_settings()  # the daemon's own speech is off
    assert not backends.speak
    calls = tmp_path / "espeak-calls.txt"
    wrapper = tmp_path / "bin" / "espeak-ng"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{calls}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    notifier = Notifier(NotifySettings(backends=backends, events={"job_succeeded": ["audio"],
                                                                  "job_failed": ["audio"]},
                                       coalesce_seconds=0.05), tmp_path)
    notifier.notify("job_failed", "job quiet failed", "nobody asked to hear it", job_id="j1")
    notifier.notify("job_succeeded", "job loud succeeded", "eval accuracy 0.91", speak=True, job_id="j2")
    notifier.close(timeout=60)
    spoken = calls.read_text().splitlines()
    assert len(spoken) == 1 and "job loud succeeded" in spoken[0], spoken
    journal = [json.loads(line) for line in (tmp_path / "logs" / "notifications.jsonl").read_text().splitlines()]
    assert {r["title"]: r["backends"]["audio"] for r in journal} == {"job quiet failed": "sent",
                                                                     "job loud succeeded": "sent"}
