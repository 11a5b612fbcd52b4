"""A minimal Chrome DevTools Protocol client over `--remote-debugging-pipe`, for the browser tests (no dependencies).

Chromium reads JSON commands on fd 3 and writes responses and events on fd 4, each message ending in a
NUL byte. Every call shares one hard deadline; leaving the `with` block always kills Chromium (its whole
process group, which it leads) and removes its temporary profile.

    with Chromium("/usr/bin/chromium") as cr:
        tab = cr.open("file:///tmp/page.html")          # a new tab's session, loaded
        cr.evaluate(tab, "document.title")              # -> 'the title'
        assert not cr.errors and not cr.dialogs         # console errors/warnings, exceptions, alert()s
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--remote-debugging-pipe"]


class CDPError(RuntimeError):
    """A command failed, the page threw while evaluating, Chromium went away, or the deadline passed."""


class Chromium:
    """Headless Chromium driven through the DevTools pipe; `events` holds every event received, in order."""

    def __init__(self, binary: str | os.PathLike, *, width: int = 1200, height: int = 800, timeout: float = 30.0):
        self.width, self.height = width, height
        self.deadline = time.monotonic() + timeout
        self.events: list[dict] = []
        self.errors: list[str] = []  # console errors / warnings and uncaught exceptions, as text
        self.dialogs: list[str] = []  # alert / confirm / prompt messages (each dismissed at once)
        self._id, self._buf = 0, b""
        self._profile = tempfile.TemporaryDirectory(prefix="featuretree-cdp-", ignore_cleanup_errors=True)
        self._stderr = tempfile.TemporaryFile()
        child_in, self._out = os.pipe()  # we write commands, Chromium reads them on its fd 3
        self._in, child_out = os.pipe()  # Chromium writes on its fd 4, we read
        # copies above fd 10, so placing them on 3 and 4 in the child cannot overwrite one with the other
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (child_in, child_out)]

        def onto_3_and_4() -> None:  # runs in the child before exec; dup2 clears close-on-exec
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        try:
            self.proc = subprocess.Popen(
                [str(binary), *FLAGS, f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr, pass_fds=(3, 4),
                preexec_fn=onto_3_and_4, start_new_session=True)
        except BaseException:
            self._close_fds()
            raise
        finally:
            for fd in (child_in, child_out, *high):
                os.close(fd)

    # ---- protocol -------------------------------------------------------------------------------------
    def _write(self, msg: dict) -> None:
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._out, data):]

    def _receive(self, wait: float) -> bool:
        """Append what Chromium sends within `wait` seconds to the buffer; False if nothing came."""
        if not select.select([self._in], [], [], max(wait, 0.0))[0]:
            return False
        chunk = os.read(self._in, 1 << 20)
        if not chunk:
            raise CDPError(f"Chromium closed the DevTools pipe; stderr: {self.stderr()[-1500:]}")
        self._buf += chunk
        return True

    def _read(self) -> dict:
        """The next message; events are recorded (and dialogs dismissed) on the way."""
        while b"\0" not in self._buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise CDPError(f"no answer from Chromium before the deadline; stderr: {self.stderr()[-1500:]}")
            self._receive(left)
        raw, self._buf = self._buf.split(b"\0", 1)
        msg = json.loads(raw)
        if "method" in msg:
            self._event(msg)
        return msg

    def _event(self, msg: dict) -> None:
        self.events.append(msg)
        method, p = msg["method"], msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
            self.errors.append(f"console.{p['type']}: " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.errors.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            self.errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
        elif method == "Page.javascriptDialogOpening":
            self.dialogs.append(p.get("message", ""))
            self._id += 1  # dismiss it, or the page would hang; the answer is not awaited
            self._write({"id": self._id, "method": "Page.handleJavaScriptDialog", "params": {"accept": False},
                         "sessionId": msg.get("sessionId")})

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Run one DevTools command (in `session`, or on the browser) and return its result."""
        self._id += 1
        sent = self._id
        self._write({"id": sent, "method": method, "params": params or {}, **({"sessionId": session} if session else {})})
        while True:
            msg = self._read()
            if msg.get("id") == sent:
                if "error" in msg:
                    raise CDPError(f"{method} failed: {msg['error']}")
                return msg.get("result", {})

    def wait_event(self, method: str, session: str | None = None, since: int = 0) -> dict:
        """The first event `method` (of `session`) at index >= `since` in `events`, reading until it comes."""
        i = since
        while True:
            while i < len(self.events):
                e = self.events[i]
                i += 1
                if e["method"] == method and (session is None or e.get("sessionId") == session):
                    return e
            self._read()

    # ---- a tab ----------------------------------------------------------------------------------------
    def open(self, url: str) -> str:
        """Open `url` in a new tab and wait for its load event; returns the tab's session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})
        session = self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                         "deviceScaleFactor": 1, "mobile": False}, session)
        since = len(self.events)
        self.send("Page.navigate", {"url": url}, session)
        self.wait_event("Page.loadEventFired", session, since)
        return session

    def evaluate(self, session: str, expression: str) -> Any:
        """The JSON value of a JS expression in the tab (promises awaited); CDPError if it throws."""
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                      session)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise CDPError(f"{expression[:80]!r} threw: {d.get('exception', {}).get('description') or d.get('text')}")
        return r["result"].get("value")

    def wait_until(self, session: str, expression: str, timeout: float = 10.0, poll: float = 0.1) -> Any:
        """Poll a JS expression until it is truthy; returns its value (CDPError after `timeout`)."""
        end = min(self.deadline, time.monotonic() + timeout)
        while True:
            value = self.evaluate(session, expression)
            if value:
                return value
            if time.monotonic() > end:
                raise CDPError(f"{expression[:120]!r} still false after {timeout} s")
            self.pause(poll)

    def pause(self, seconds: float) -> None:
        """Wait, still reading (and recording) the events that arrive meanwhile."""
        end = min(time.monotonic() + seconds, self.deadline)
        while (left := end - time.monotonic()) > 0:
            if self._receive(left):
                while b"\0" in self._buf:
                    self._read()

    def click(self, session: str, x: float, y: float) -> None:
        """A left click at viewport point (x, y): move there, press, release."""
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y}, session)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
                      session)

    def screenshot(self, session: str, path: str | os.PathLike) -> Path:
        """Save the tab's viewport as PNG at `path`."""
        data = self.send("Page.captureScreenshot", {"format": "png"}, session)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    # ---- shutting down --------------------------------------------------------------------------------
    def _close_fds(self) -> None:
        for fd in (self._in, self._out):
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        """Kill Chromium (the process group it leads) and clean up; safe to call twice."""
        if getattr(self, "proc", None) is not None:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):  # let it close its own children first
                self._write({"id": self._id + 1, "method": "Browser.close"})
                self.proc.wait(timeout=3)
            with contextlib.suppress(ProcessLookupError, PermissionError):  # then make sure nothing is left
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self.proc = None
        self._close_fds()
        self._stderr.close()
        self._profile.cleanup()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_png(path: Path) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) to (h, w, channels) uint8."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    w, h, depth, ctype, _, _, interlace = header
    assert depth == 8 and ctype in (2, 6) and interlace == 0, header
    bpp, raw = (3 if ctype == 2 else 4), zlib.decompress(b"".join(idat))
    stride = w * bpp
    out, prev = np.zeros((h, stride), dtype=np.int64), np.zeros(stride, dtype=np.int64)
    for y in range(h):  # undo each scanline's filter (PNG spec 9.2); Sub/Up vectorised, Average/Paeth by byte
        f, start = raw[y * (stride + 1)], y * (stride + 1) + 1
        line = np.frombuffer(raw, np.uint8, stride, start).astype(np.int64)
        if f == 0:
            cur = line
        elif f == 1:
            cur = line.reshape(-1, bpp).cumsum(0).reshape(-1) & 255
        elif f == 2:
            cur = (line + prev) & 255
        else:
            cur_l, lin, up = [0] * stride, line.tolist(), prev.tolist()
            for i in range(stride):
                a = cur_l[i - bpp] if i >= bpp else 0
                b, c = up[i], (up[i - bpp] if i >= bpp else 0)
                if f == 3:
                    cur_l[i] = (lin[i] + ((a + b) >> 1)) & 255
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    cur_l[i] = (lin[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            cur = np.array(cur_l, dtype=np.int64)
        out[y], prev = cur, cur
    return out.reshape(h, w, bpp).astype(np.uint8)
