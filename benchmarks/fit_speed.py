"""How much ``bbswap fit`` costs beyond importing torch.

Runs, each as a fresh process and several times (median reported):

- ``python -c "import torch"``: the baseline;
- ``bbswap fit resnet50 --channels 684 --stride 16 --in-chans 1 --input 1x1x128x316``
  (the seed's target);
- ``bbswap fit densenet100 --stride 32 --channels 684``;
- ``bbswap fit convnext_tiny --stride 16 --channels 256 --allow-truncate --rounding
  floor`` (ConvNeXt's 2x2 downsampling convs cannot lose their stride exactly, so the
  only exact candidate cuts ``features`` after its 1/16 stage; its sizes are floor(H/16)).

Each fit runs with ``--json`` (no progress bar; the JSON gives the number of candidates
it evaluated). Wall time is measured around each child process. The target: every fit
within 2x the wall time of ``import torch``.

Usage: ``python benchmarks/fit_speed.py [--runs N] [--check]``; ``--check`` exits with
status 1 when the target is missed. The console script is the ``bbswap`` next to the
running interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from inspect_speed import print_table

TARGET = 2.0
SCRIPT = Path(sys.executable).parent / "bbswap"

FITS = {
    "fit resnet50 c684 s16 in1 1x1x128x316": [
        "resnet50", "--channels", "684", "--stride", "16", "--in-chans", "1",
        "--input", "1x1x128x316"],
    "fit densenet100 s32 c684": ["densenet100", "--stride", "32", "--channels", "684"],
    "fit convnext_tiny s16 c256 truncate floor": [
        "convnext_tiny", "--stride", "16", "--channels", "256", "--allow-truncate",
        "--rounding", "floor"],
}  # fmt: skip


def measure(argv: list[str]) -> tuple[float, str]:
    """Run ``argv`` once; its wall time and its stdout."""
    env = {**os.environ, "COLUMNS": "160"}
    start = time.perf_counter()
    proc = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, check=False
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr.strip()}")
    return wall, proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per command (median)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args()
    if not SCRIPT.is_file():
        raise SystemExit(f"console script not found: {SCRIPT} (pip install -e .)")

    commands = {"import torch": [sys.executable, "-c", "import torch"]}
    commands |= {name: [str(SCRIPT), "fit", *fit_args, "--json"] for name, fit_args in FITS.items()}
    evaluated: dict[str, str] = {}
    for name, argv in commands.items():  # warm the file cache; not timed
        _, out = measure(argv)
        if name != "import torch":
            data = json.loads(out)
            exact = sum(c["exact"] for c in data["candidates"])
            evaluated[name] = f"{data['evaluated']} ({exact} exact)"
    walls: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):  # interleaved, so drift affects every command alike
        for name, argv in commands.items():
            walls[name].append(measure(argv)[0])

    wall = {n: statistics.median(runs) for n, runs in walls.items()}
    base = wall["import torch"]
    header = ("command", "wall s", "wall x", "candidates", f"<= {TARGET:g}x")
    rows = []
    missed = False
    for name in commands:
        ratio = wall[name] / base
        baseline = name == "import torch"
        ok = ratio <= TARGET
        missed |= not ok and not baseline
        rows.append((name, f"{wall[name]:.2f}", f"{ratio:.2f}", evaluated.get(name, "-"),
                     "-" if baseline else ("yes" if ok else "NO")))  # fmt: skip
    print(
        f"median of {args.runs} runs each; python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print_table(header, rows)
    print("target holds" if not missed else "target MISSED")
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
