"""How much the README's quick start, ``bbswap fit ... -o backbone.py``, costs beyond
importing torch.

Runs, each as a fresh process and several times (median reported):

- ``python -c "import torch"``: the baseline;
- ``bbswap fit resnet50 --channels 684 --stride 16 --in-chans 1 --input 1x1x128x316
  -o backbone.py``: trace, search, build with real weights, emit, verify the file by
  round trip and write it, into a new empty folder each run.

Wall time is measured around each child process. Peak RSS is the ``ru_maxrss`` that
``os.wait4`` returns for that one child, which on Linux covers every process it started
and waited for too (a second interpreter would count). The targets: wall time and peak
RSS each within 2x those of ``import torch``.

Peak RSS counts the pages of torch's shared libraries that happen to be resident, which
depends on the torch build (a CUDA build maps far more at import than the CPU one) and,
on a busy machine, on what the page cache holds. So the peak of the anonymous memory
(``RssAnon`` in ``/proc/PID/status``, read every few milliseconds: the tensors, the
Python objects) is printed too, with its growth beyond ``import torch``, which depends
on neither.

Usage: ``python benchmarks/quickstart_speed.py [--runs N] [--check]``; ``--check`` exits
with status 1 when a target is missed. The console script is the ``bbswap`` next to the
running interpreter. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from inspect_speed import SCRIPT, print_table

POLL = 0.005  # seconds between two reads of the child's anonymous memory

TARGET = 2.0
FIT = ["fit", "resnet50", "--channels", "684", "--stride", "16", "--in-chans", "1",
       "--input", "1x1x128x316"]  # fmt: skip
NAME = "fit resnet50 c684 s16 in1 1x1x128x316 -o"


@dataclass(frozen=True)
class Sample:
    wall: float  # seconds
    rss: int  # bytes: peak resident set, the child's and its children's
    anon: int  # bytes: peak anonymous memory of the child, as sampled


def _anon_bytes(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:  # the child has just ended
        return 0
    for line in text.splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(argv: list[str]) -> Sample:
    """Run ``argv`` once: its wall time, its peak RSS and its peak anonymous memory."""
    env = {**os.environ, "COLUMNS": "160"}
    peak = [0]
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, env=env)  # fmt: skip
        done = threading.Event()

        def sample() -> None:
            while not done.wait(POLL):
                peak[0] = max(peak[0], _anon_bytes(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            detail = err.read().decode(errors="replace").strip()
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{detail}")
    # ru_maxrss is in KiB on Linux
    return Sample(wall, usage.ru_maxrss * 1024, peak[0])


def run_fit() -> Sample:
    """The quick-start command once, writing into a new empty folder."""
    with tempfile.TemporaryDirectory() as folder:
        sample = measure([str(SCRIPT), *FIT, "-o", str(Path(folder) / "backbone.py")])
        if not (Path(folder) / "backbone.py").is_file():
            raise SystemExit("the quick-start command wrote no backbone.py")
    return sample


def torch_build() -> str:
    import torch

    cuda = torch.version.cuda
    return f"torch {torch.__version__} ({f'CUDA {cuda} build' if cuda else 'CPU build'})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per command (median)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    if not SCRIPT.is_file():
        raise SystemExit(f"console script not found: {SCRIPT} (pip install -e .)")

    def baseline() -> Sample:
        return measure([sys.executable, "-c", "import torch"])

    commands = {"import torch": baseline, NAME: run_fit}
    for command in commands.values():  # warm the file cache; not timed
        command()
    samples: dict[str, list[Sample]] = {name: [] for name in commands}
    for _ in range(args.runs):  # interleaved, so drift affects every command alike
        for name, command in commands.items():
            samples[name].append(command())

    wall = {n: statistics.median(s.wall for s in runs) for n, runs in samples.items()}
    rss = {n: statistics.median(s.rss for s in runs) for n, runs in samples.items()}
    anon = {n: statistics.median(s.anon for s in runs) for n, runs in samples.items()}
    base_wall, base_rss = wall["import torch"], rss["import torch"]
    header = ("command", "wall s", "wall x", "peak RSS MiB", "RSS x", "anon MiB", "beyond",
              f"both <= {TARGET:g}x")  # fmt: skip
    rows = []
    missed = False
    for name in commands:
        w, r = wall[name] / base_wall, rss[name] / base_rss
        baseline_row = name == "import torch"
        ok = w <= TARGET and r <= TARGET
        missed |= not ok
        rows.append((name, f"{wall[name]:.2f}", f"{w:.2f}", f"{rss[name] / 2**20:.0f}",
                     f"{r:.2f}", f"{anon[name] / 2**20:.0f}",
                     f"{(anon[name] - anon['import torch']) / 2**20:+.0f}",
                     "-" if baseline_row else ("yes" if ok else "NO")))  # fmt: skip
    print(
        f"median of {args.runs} runs each; python {sys.version.split()[0]}, {torch_build()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    print_table(header, rows)
    print("targets hold" if not missed else "target MISSED")
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
