#!/usr/bin/env python3
"""Set up and run tokenq from a fresh clone: the two commands of the README's quick start.

    python3 dev.py up      run everything locally (embedded Valkey, simulator, workers, demo)
    python3 dev.py test    lint, type-check and run the whole test suite
    python3 dev.py bench [NAME]   run bench/NAME.py (throughput, the default; ratelimit; cost;
                                  fuzz [--seed S] [--entries N]: hostile entries vs. a fleet;
                                  chaos [--seed S]: faults, kills, a Redis restart vs. a fleet;
                                  semantic [--seed S]: the semantic cache on paraphrases;
                                  report: rollups, report latency, the finishing write;
                                  floor: what the anthropic SDK costs a worker;
                                  oracle, replay: the router's reach and its spread, offline)

Each command first makes ./.venv and installs tokenq with its dev tools into it (again only
when pyproject.toml changed), so a machine with Python 3.11+ needs nothing else; pip's output
is shown only when the install fails. Arguments after the command go to `tokenq up`, to
pytest or to the benchmark.

Another config file: `python3 dev.py up --config PATH` (or TOKENQ_CONFIG=PATH); the default
is ./config.toml. `python3 dev.py up --help` lists the other options of `tokenq up`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".tokenq-installed"


def say(text: str) -> None:
    print(f"dev.py: {text}", file=sys.stderr, flush=True)


def ensure_venv() -> None:
    """Create .venv and install tokenq[dev] into it unless pyproject.toml is unchanged."""
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py may be run by an older python3
        sys.exit(f"dev.py: tokenq needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if PY.exists() and STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not PY.exists():
        say("creating .venv")
        try:
            venv.create(VENV, with_pip=True)
        except subprocess.CalledProcessError:
            sys.exit(
                "dev.py: could not create a virtual environment with pip. On Debian or Ubuntu "
                "install the venv module first (apt install python3-venv), then run again."
            )
    say("installing tokenq and its dev tools into .venv (the first time takes a minute)")
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar=off"]
    # Quiet unless it fails: a newcomer needs pip's pages of output only to see what broke.
    done = subprocess.run([*pip, "-e", f"{ROOT}[dev]"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        sys.exit(f"dev.py: installing into .venv failed (pip exit {done.returncode}; above)")
    STAMP.write_text(wanted)


def run(args: list[str]) -> int:
    return subprocess.run(args, cwd=ROOT).returncode


def test(extra: list[str]) -> int:
    """ruff, mypy, then pytest. pytest's "no tests collected" (5) is not a failure."""
    steps = [
        [str(PY), "-m", "ruff", "check", "."],
        [str(PY), "-m", "ruff", "format", "--check", "."],
        [str(PY), "-m", "mypy"],
    ]
    for step in steps:
        say(" ".join(Path(a).name if a == str(PY) else a for a in step))
        if run(step) != 0:
            return 1
    say("pytest")
    code = run([str(PY), "-m", "pytest", "-q", *extra])
    if code == 5:
        say("pytest collected no tests")
        return 0
    return code


def main() -> int:
    command, extra = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if command not in ("up", "test", "bench"):
        print(__doc__, file=sys.stderr)
        return 2
    ensure_venv()
    if command == "up":
        return run([str(BIN / "tokenq"), "up", *extra])
    if command == "test":
        return test(extra)
    name = extra.pop(0) if extra and not extra[0].startswith("-") else "throughput"
    script = ROOT / "bench" / f"{name}.py"
    if not script.exists() or name in ("common", "quality"):
        print(
            f"dev.py: no benchmark {name!r}; try throughput, ratelimit, cost, oracle, replay, "
            "fuzz, chaos, semantic, classifier, report or floor",
            file=sys.stderr,
        )
        return 2
    return run([str(PY), str(script), *extra])


if __name__ == "__main__":
    sys.exit(main())
