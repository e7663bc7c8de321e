"""A real local HTTP server that records webhook POSTs (optionally answering slowly)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class _Recorder(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.server.delay_s:
            time.sleep(self.server.delay_s)
        self.server.posts.append({"path": self.path, "json": json.loads(body),
                                  "content_type": self.headers.get("Content-Type")})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.posts, server.delay_s = [], 0.0
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


# A stand-in desktop notification server on a private session bus: it answers Notify like a real one and prints
# every notification as a JSON line, so the desktop backend's real D-Bus round trip can be checked headless.
FAKE_NOTIFICATION_SERVER = r"""
import json
from jeepney import HeaderFields, MessageType, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection
conn = open_dbus_connection(bus="SESSION")
conn.send_and_get_reply(message_bus.RequestName("org.freedesktop.Notifications"))
print("ready", flush=True)
count = 0
while True:
    msg = conn.receive()
    if msg.header.message_type != MessageType.method_call:
        continue
    member = msg.header.fields.get(HeaderFields.member)
    if member == "Notify":
        count += 1
        app, _, _, summary, body = msg.body[:5]
        print(json.dumps({"app": app, "summary": summary, "body": body}), flush=True)
        conn.send(new_method_return(msg, "u", (count,)))
    elif member == "GetServerInformation":
        conn.send(new_method_return(msg, "ssss", ("fake", "trainbox-tests", "1", "1.2")))
    elif member == "GetCapabilities":
        conn.send(new_method_return(msg, "as", (["body"],)))
"""


class DesktopBus:
    def __init__(self, address: str, server: subprocess.Popen[str]):
        self.address, self.server = address, server
        self.received: list[dict] = []

    def wait_for(self, n: int, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.received) < n and time.monotonic() < deadline:
            line = self.server.stdout.readline()
            if line:
                self.received.append(json.loads(line))
        return self.received


@pytest.fixture
def desktop_bus(monkeypatch):
    """A private D-Bus session with a notification server; skipped where dbus-daemon or jeepney is missing."""
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon is not installed (apt-get install dbus)")
    pytest.importorskip("jeepney", reason="jeepney (dev extra) is needed for the stand-in notification server")
    bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address=1"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    address = bus.stdout.readline().strip()
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", address)
    server = subprocess.Popen([sys.executable, "-c", FAKE_NOTIFICATION_SERVER], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": address})
    assert server.stdout.readline().strip() == "ready"
    yield DesktopBus(address, server)
    server.kill()
    server.wait()
    bus.kill()
    bus.wait()
