"""Headless Chromium driven over the DevTools protocol, with aiohttp's websocket client.

The system's Chromium (Debian's `chromium`), no downloaded browser and no driver package:
start it with a fresh profile and `--remote-debugging-port=0`, read the port it chose from
its stderr, attach to its page and send protocol commands (Page.navigate, Runtime.evaluate,
Page.captureScreenshot).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--remote-debugging-port=0",
)  # fmt: skip
LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


def chromium() -> str | None:
    """The Chromium executable on PATH, if any."""
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)


class Page:
    """One page of the browser: send protocol commands, evaluate, take screenshots."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events in between are skipped)."""
        ident = next(self._ids)
        await self.ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        async for message in self.ws:
            reply = json.loads(message.data)
            if reply.get("id") == ident:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
        raise RuntimeError(f"the browser closed the connection during {method}")

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        reply = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression!r}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def screenshot(self, path: Path, width: int = 1400) -> None:
        """A PNG of the whole page."""
        height = int(await self.evaluate("document.documentElement.scrollHeight"))
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=1, mobile=False)  # fmt: skip
        shot = await self.send("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))


@contextlib.asynccontextmanager
async def open_browser(executable: str, *, timeout_s: float = 60.0) -> AsyncIterator[Page]:
    """Start Chromium with a fresh profile and yield its page; RuntimeError if it does not
    start (with what it said)."""
    with tempfile.TemporaryDirectory(prefix="tokenq-chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            executable, *FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1000",
            "about:blank", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "HOME": profile},
        )  # fmt: skip
        said: list[str] = []
        try:
            endpoint = await asyncio.wait_for(_endpoint(proc, said), timeout_s)
            drain = asyncio.create_task(_drain(proc))
            port = endpoint.split(":")[2].split("/")[0]
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as reply:
                    targets = await reply.json()
                page = next(t for t in targets if t.get("type") == "page")
                async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    yield Page(ws)
            drain.cancel()
        except (TimeoutError, StopIteration, aiohttp.ClientError) as exc:
            raise RuntimeError(
                f"{executable} did not start a page ({exc!r}); it said:\n" + "".join(said)
            ) from None
        finally:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()


async def _endpoint(proc: asyncio.subprocess.Process, said: list[str]) -> str:
    assert proc.stderr is not None
    while line := (await proc.stderr.readline()).decode(errors="replace"):
        said.append(line)
        found = LISTENING.search(line)
        if found:
            return found[1]
    raise TimeoutError("chromium exited")


async def _drain(proc: asyncio.subprocess.Process) -> None:
    """Keep reading the browser's stderr so that it never blocks on a full pipe."""
    assert proc.stderr is not None
    while await proc.stderr.readline():
        pass
