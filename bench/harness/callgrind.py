"""Instructions counted by callgrind for one run of a command (needs valgrind)."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path


def instructions(argv: Sequence[str], label: str, env: Mapping[str, str] | None = None) -> int:
    """Run `argv` under callgrind; its total instructions (every thread). Exits with the output on a failure."""
    with tempfile.NamedTemporaryFile(prefix="callgrind.") as out:
        run = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out.name}", *argv],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        if run.returncode != 0:
            sys.exit(f"{label}: the measurement failed under valgrind:\n{run.stdout}{run.stderr[-2000:]}")
        match = re.search(rb"^(?:summary|totals): (\d+)", Path(out.name).read_bytes(), re.M)
    if match is None:
        sys.exit(f"{label}: no instruction total in the callgrind output")
    return int(match.group(1))
