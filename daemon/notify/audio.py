"""Audio: a short bundled sound (winsound, paplay or aplay, afplay) and an optional spoken sentence."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from daemon.config import NotifyBackendSettings
from daemon.notify.note import Note, run_command

SOUNDS = Path(__file__).parent / "sounds"
_SAPI = ("Add-Type -AssemblyName System.Speech; "
         "(New-Object System.Speech.Synthesis.SpeechSynthesizer).Speak($env:TRAINBOX_SAY)")


def sound_for(note: Note) -> Path:
    return SOUNDS / ("success.wav" if note.good else "alert.wav")


def _pulse_running() -> bool:
    if not shutil.which("pactl"):
        return bool(os.environ.get("PULSE_SERVER"))
    try:
        return subprocess.run(["pactl", "info"], capture_output=True, timeout=3).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _alsa_has_card() -> bool:
    cards = Path("/proc/asound/cards")
    return cards.exists() and "no soundcards" not in cards.read_text(errors="replace")


def _linux_player(settings: NotifyBackendSettings) -> list[str] | None:
    """The command that plays a wav here, or None. A configured ALSA ``audio_device`` is trusted as given."""
    device = settings.audio_device
    if shutil.which("paplay") and _pulse_running():  # PulseAudio or PipeWire: the device is a sink name
        return ["paplay"] + ([f"--device={device}"] if device else [])
    if shutil.which("aplay") and (device or _alsa_has_card()):  # plain ALSA: the device is a PCM name
        return ["aplay", "-q"] + (["-D", device] if device else [])
    return None


def probe(settings: NotifyBackendSettings) -> tuple[bool, str]:
    if not settings.audio:
        return False, "disabled (notify.backends.audio: false)"
    if sys.platform == "win32":
        return True, "winsound" + (" + SAPI speech" if settings.speak else "")
    if sys.platform == "darwin":
        return True, "afplay" + (" + say" if settings.speak else "")
    player = _linux_player(settings)
    if player is None:
        have = [p for p in ("paplay", "aplay") if shutil.which(p)]
        why = ("no sound server or sound card found" if have
               else "neither paplay nor aplay found: install pulseaudio-utils or alsa-utils")
        return False, f"{why} (or set notify.backends.audio_device)"
    reason = player[0]
    if settings.speak:
        reason += " + espeak-ng" if shutil.which("espeak-ng") else " (speech off: install espeak-ng)"
    return True, reason


def send(note: Note, settings: NotifyBackendSettings) -> None:
    timeout = settings.timeout_seconds
    speak = settings.speak or note.speak
    wav = sound_for(note)
    if sys.platform == "win32":
        import winsound
        winsound.PlaySound(str(wav), winsound.SND_FILENAME)
        if speak:
            run_command(["powershell", "-NoProfile", "-NonInteractive", "-Command", _SAPI], timeout,
                        env={"TRAINBOX_SAY": note.sentence()})
        return
    if sys.platform == "darwin":
        run_command(["afplay", str(wav)], timeout)
        if speak:
            run_command(["say", note.sentence()], timeout)
        return
    player = _linux_player(settings)
    if player is None:
        raise RuntimeError(probe(settings)[1])
    run_command(player + [str(wav)], timeout)
    if speak and shutil.which("espeak-ng"):
        speak_linux(note.sentence(), player, timeout)


def speak_linux(sentence: str, player: list[str], timeout: float) -> None:
    """Synthesise with espeak-ng into a wav, then play it like the chime (same device choice)."""
    with tempfile.TemporaryDirectory(prefix="trainbox-say-") as tmp:
        wav = Path(tmp) / "say.wav"
        run_command(["espeak-ng", "-w", str(wav), sentence], timeout)
        run_command(player + [str(wav)], timeout)
