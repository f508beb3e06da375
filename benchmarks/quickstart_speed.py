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
RSS each within 2x those of ``import torch``. The peak beyond ``import torch`` is printed
as well: it does not depend on the torch build, while the baseline does (a CUDA build
maps far more memory at import than the CPU one).

Usage: ``python benchmarks/quickstart_speed.py [--runs N] [--check]``; ``--check`` exits
with status 1 when a target is missed. The console script is the ``bbswap`` next to the
running interpreter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from inspect_speed import SCRIPT, Sample, measure

TARGET = 2.0
FIT = ["fit", "resnet50", "--channels", "684", "--stride", "16", "--in-chans", "1",
       "--input", "1x1x128x316"]  # fmt: skip
NAME = "fit resnet50 c684 s16 in1 1x1x128x316 -o"


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
    base_wall, base_rss = wall["import torch"], rss["import torch"]
    header = ("command", "wall s", "wall x", "peak RSS MiB", "beyond", "RSS x",
              f"both <= {TARGET:g}x")  # fmt: skip
    rows = []
    missed = False
    for name in commands:
        w, r = wall[name] / base_wall, rss[name] / base_rss
        baseline_row = name == "import torch"
        ok = w <= TARGET and r <= TARGET
        missed |= not ok
        rows.append((name, f"{wall[name]:.2f}", f"{w:.2f}", f"{rss[name] / 2**20:.0f}",
                     f"{(rss[name] - base_rss) / 2**20:+.0f}", f"{r:.2f}",
                     "-" if baseline_row else ("yes" if ok else "NO")))  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print(
        f"median of {args.runs} runs each; python {sys.version.split()[0]}, {torch_build()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    for i, row in enumerate([header, *rows]):
        print(
            "  ".join(
                c.ljust(wd) if j == 0 else c.rjust(wd) for j, (c, wd) in enumerate(zip(row, widths))
            )
        )
        if i == 0:
            print("  ".join("-" * wd for wd in widths))
    print("targets hold" if not missed else "target MISSED")
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
