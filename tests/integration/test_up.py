"""`tokenq up`, the quick start: embedded Valkey, simulator, workers, demo producer, tail."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from worker.embedded import free_port, ping

ROOT = Path(__file__).resolve().parents[2]


async def test_up_runs_the_demo_to_the_end(tmp_path: Path) -> None:
    redis_port, sim_port = free_port(), free_port()
    text = (ROOT / "config.toml").read_text()
    for old, new in [
        ("embedded_port = 6399", f"embedded_port = {redis_port}"),
        ('data_dir = ".tokenq/valkey"', 'data_dir = "data"'),
        (
            'simulator_url = "http://127.0.0.1:8787"',
            f'simulator_url = "http://127.0.0.1:{sim_port}"',
        ),
        # The demo's low-priority jobs go to a batch; flush and poll within a second here.
        ("flush_interval_s = 60.0", "flush_interval_s = 1.0"),
        ("poll_s = 10.0", "poll_s = 0.5"),
        # With a webhook, `up` starts `tokenq alerts` too (nothing listens there).
        ('webhook_url = ""', 'webhook_url = "http://127.0.0.1:9/hook"'),
    ]:
        assert old in text
        text = text.replace(old, new)
    config = tmp_path / "config.toml"
    config.write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    tokenq = [sys.executable, "-m", "worker", "--config", str(config)]
    proc = await asyncio.create_subprocess_exec(
        *tokenq, "up", "--demo-jobs", "40", "--demo-rate", "200", "--latency-ms", "10",
        "--exit-when-done", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=env,
    )  # fmt: skip
    try:
        async with asyncio.timeout(90):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
        stop = await asyncio.create_subprocess_exec(*tokenq, "redis", "--stop")
        await stop.wait()
    text = out.decode()
    assert proc.returncode == 0, text
    assert "using the simulator" in text
    assert "tokenq up: alerts go to http://127.0.0.1:9/hook" in text
    assert "malformed on purpose" in text  # the demo says its error lines are meant
    assert "demo: all 40 jobs have a result" in text
    assert "usage events, cost $" in text
    assert " ok " in text  # tail lines of finished jobs
    assert not ping(redis_port)
    assert (tmp_path / "data" / "appendonlydir").is_dir()
