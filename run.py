#!/usr/bin/env python3
"""The repository's two commands, needing only Python 3.10+:

    python3 run.py demo   # segment a CT, write the mask, a PNG overlay and the volume in mL
    python3 run.py test   # run the whole test suite

Each creates (or reuses) a virtual environment in ``.venv`` with the pinned CPU build of torch
and everything the tests need (``requirements-ci.txt``), reinstalling only when that file
changes. Extra arguments after the command are passed on (to pytest, or to the demo).
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
REQUIREMENTS = ROOT / "requirements-ci.txt"
STAMP = VENV / ".vnetseg-requirements.sha256"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_env() -> Path:
    """Create or update .venv; return its python."""
    if sys.version_info < (3, 10):  # noqa: UP036 - run.py is started by whatever python3 there is
        sys.exit(f"Python 3.10 or newer is needed, this is {sys.version.split()[0]}")
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes() + (ROOT / "pyproject.toml").read_bytes()).hexdigest()
    py = venv_python()
    if py.exists() and STAMP.exists() and STAMP.read_text().strip() == wanted:
        return py
    if not py.exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing requirements (CPU build of torch; first time only)", flush=True)
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
    STAMP.write_text(wanted)
    return py


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "env"):
        print(__doc__)
        return 2
    py = str(ensure_env())
    command, rest = argv[0], argv[1:]
    if command == "env":
        return 0
    if command == "demo":
        return subprocess.call([py, str(ROOT / "scripts" / "demo.py"), *rest], cwd=ROOT)
    code = subprocess.call([py, "-m", "pytest", *rest], cwd=ROOT)
    if code == 5:
        print("pytest collected no tests: that is a failure, not a pass", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
