"""How much ``bbswap inspect`` costs beyond importing torch.

Runs, each as a fresh process and several times (median reported):

- ``python -c "import torch"``: the baseline;
- ``bbswap inspect resnet50 --input 1x3x224x224``;
- ``bbswap inspect resnet50 --input 1x3x4096x4096``: on the meta device the input
  size should not matter.

Wall time is measured around each child process. Peak RSS is the child's own
``ru_maxrss`` as returned by ``os.wait4`` for that one process (Linux reports KiB),
so runs cannot contaminate each other the way ``getrusage(RUSAGE_CHILDREN)`` -- the
maximum over every child waited for so far -- would. The targets: wall time and peak
RSS of each ``inspect`` within 1.5x those of ``import torch``.

Usage: ``python benchmarks/inspect_speed.py [--runs N] [--check]``; ``--check`` exits
with status 1 when a target is missed. The console script is the ``bbswap`` next to
the running interpreter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TARGET = 1.5
SCRIPT = Path(sys.executable).parent / "bbswap"


@dataclass(frozen=True)
class Sample:
    wall: float  # seconds
    rss: int  # bytes


def measure(argv: list[str]) -> Sample:
    """Run ``argv`` once; its wall time and its own peak resident set size."""
    env = {**os.environ, "COLUMNS": "160"}
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, env=env)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            detail = err.read().decode(errors="replace").strip()
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{detail}")
    # ru_maxrss is in KiB on Linux and in bytes on macOS
    rss = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return Sample(wall, rss)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """The rows under the header and a rule, the first column left-aligned, the rest
    right-aligned, each as wide as its widest cell."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print(
            "  ".join(
                c.ljust(wd) if j == 0 else c.rjust(wd) for j, (c, wd) in enumerate(zip(row, widths))
            )
        )
        if i == 0:
            print("  ".join("-" * wd for wd in widths))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per command (median)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    if not SCRIPT.is_file():
        raise SystemExit(f"console script not found: {SCRIPT} (pip install -e .)")

    commands = {
        "import torch": [sys.executable, "-c", "import torch"],
        "inspect resnet50 1x3x224x224": [
            str(SCRIPT), "inspect", "resnet50", "--input", "1x3x224x224"],
        "inspect resnet50 1x3x4096x4096": [
            str(SCRIPT), "inspect", "resnet50", "--input", "1x3x4096x4096"],
    }  # fmt: skip
    for argv in commands.values():  # warm the file cache; not timed
        measure(argv)
    samples: dict[str, list[Sample]] = {name: [] for name in commands}
    for _ in range(args.runs):  # interleaved, so drift affects every command alike
        for name, argv in commands.items():
            samples[name].append(measure(argv))

    wall = {n: statistics.median(s.wall for s in runs) for n, runs in samples.items()}
    rss = {n: statistics.median(s.rss for s in runs) for n, runs in samples.items()}
    base_wall, base_rss = wall["import torch"], rss["import torch"]

    header = ("command", "wall s", "wall x", "peak RSS MiB", "RSS x", f"both <= {TARGET}x")
    rows = []
    missed = False
    for name in commands:
        w, r = wall[name] / base_wall, rss[name] / base_rss
        baseline = name == "import torch"
        ok = w <= TARGET and r <= TARGET
        missed |= not ok
        rows.append((name, f"{wall[name]:.2f}", f"{w:.2f}", f"{rss[name] / 2**20:.0f}",
                     f"{r:.2f}", "-" if baseline else ("yes" if ok else "NO")))  # fmt: skip
    print(
        f"median of {args.runs} runs each; python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )
    print_table(header, rows)
    print("targets hold" if not missed else "target MISSED")
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
