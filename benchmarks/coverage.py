"""Coverage sweep: which torchvision and timm models bbswap inspects and fits, written to
docs/coverage.md. Three parts, chosen with ``--parts``:

- ``families``: every torchvision model and one model of every timm family (the curated
  representatives below, plus one model of every timm module none of them comes from)
  through inspect -> fit -> emit -> verify (``--no-verify``: on the meta device only), at
  1/16 and 1/32;
- ``all``: every model of ``timm.list_models()`` at 1/16, on the meta device only
  (inspect and fit, no emit or verify);
- ``sample``: a seeded random sample of timm models (100, none of them a family
  representative), verified at 1/8, 1/16 and at a 32x8 target (H/32 x W/8, one output,
  as ``fit --target 32x8:256`` fits it), whatever ``--no-verify`` says.

    python benchmarks/coverage.py                            # every part (hours on 2 cores)
    python benchmarks/coverage.py --parts families --only tv # torchvision only
    python benchmarks/coverage.py --parts all --jobs 0       # the timm list, one worker a core
    python benchmarks/coverage.py --parts sample --seed 1 --sample 50
    python benchmarks/coverage.py --limit 3 --out /tmp/c.md  # 3 models a part, to try it
    python benchmarks/coverage.py --parts all --models 'timm:vit_*,timm:pnas*' --out /tmp/c.md

Each part reports its counts (reaching every target, refused, failed), its time (and the
time per model) and every failure's reason, as a count per reason and each message whole.
It runs ``bbswap matrix`` (the library call, ``--jobs`` worker processes) and needs
torchvision and timm installed; each backbone is built with random weights, nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import fnmatch
import platform
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bbswap.backbones.registry import list_backbones
from bbswap.cli.render import matrix_markdown, matrix_summary
from bbswap.parsing import parse_strides
from bbswap.search.matrix import Matrix, matrix

PARTS = ("families", "all", "sample")
CHANNELS = 256

# One representative model per timm family: the family's smallest common member.
TIMM_FAMILIES = {
    "resnet": "resnet18",
    "resnetv2": "resnetv2_50",
    "resnest": "resnest14d",
    "res2net": "res2net50_14w_8s",
    "regnet": "regnetx_002",
    "efficientnet": "efficientnet_b0",
    "efficientnet (TF 'same' padding)": "tf_efficientnet_b0",
    "mobilenetv3": "mobilenetv3_small_100",
    "mobilenetv4": "mobilenetv4_conv_small",
    "convnext": "convnext_atto",
    "densenet": "densenet121",
    "dla": "dla34",
    "dpn": "dpn68",
    "ghostnet": "ghostnet_100",
    "ghostnetv2": "ghostnetv2_100",
    "repghostnet": "repghostnet_050",
    "hrnet": "hrnet_w18_small",
    "vovnet": "ese_vovnet19b_dw",
    "cspnet": "cspresnet50",
    "darknet": "darknet53",
    "rexnet": "rexnet_100",
    "repvgg": "repvgg_a0",
    "xception": "xception41",
    "legacy xception": "legacy_xception",
    "inception_v3": "inception_v3",
    "inception_v4": "inception_v4",
    "inception_resnet_v2": "inception_resnet_v2",
    "nfnet": "dm_nfnet_f0",
    "nf_resnet": "nf_resnet26",
    "tresnet": "tresnet_m",
    "selecsls": "selecsls42b",
    "hardcorenas": "hardcorenas_a",
    "mnasnet": "mnasnet_100",
    "fbnet": "fbnetc_100",
    "lcnet": "lcnet_050",
    "vgg": "vgg11",
    "mixnet": "mixnet_s",
    "sknet": "skresnet18",
    "senet": "seresnext26d_32x4d",
    "gernet (byobnet)": "gernet_s",
    "regnety": "regnety_002",
    "hgnet": "hgnet_tiny",
    "hgnetv2": "hgnetv2_b0",
    "mobileone": "mobileone_s0",
    "fastvit": "fastvit_t8",
    "tinynet": "tinynet_e",
    "spnasnet": "spnasnet_100",
    "edgenext": "edgenext_xx_small",
    "efficientvit (MIT)": "efficientvit_b0",
    "vit": "vit_tiny_patch16_224",
    "swin": "swin_tiny_patch4_window7_224",
    "maxvit": "maxvit_tiny_tf_224",
}
# the smallest variant names first, when a module's representative is picked by name
_SMALL = ("atto", "femto", "pico", "nano", "xxs", "tiny", "xs", "small", "mini", "s0", "b0", "t0")


@dataclass(frozen=True)
class Part:
    """One part's sweep: its matrices (title, result, family per spec) and its time."""

    name: str
    sections: tuple[tuple[str, Matrix, dict[str, str]], ...]
    seconds: float
    jobs: int

    @property
    def rows(self) -> int:
        return sum(len(m.rows) for _, m, _ in self.sections)


def timm_families() -> dict[str, str]:
    """family -> model: the curated ones, then one model of every timm module that none of
    them comes from (its smallest-sounding name, then its shortest)."""
    import timm

    available = set(timm.list_models())
    families = {f: m for f, m in TIMM_FAMILIES.items() if m in available}
    covered = set(families.values())
    for module in timm.list_modules():
        names = timm.list_models(module=module)
        if not names or covered & set(names):
            continue
        families[f"{module} (module)"] = min(names, key=_smallness)
    return families


def _smallness(name: str) -> tuple[int, int, int, str]:
    """Smaller first: a size word early in ``_SMALL``, then the first number in the name
    (a depth or a width: resnet18 before resnet50), then the length."""
    rank = next((i for i, word in enumerate(_SMALL) if word in name), len(_SMALL))
    number = re.search(r"\d+", re.sub(r"v\d+", "", name))  # not a version (beitv2)
    return rank, int(number.group()) if number else 0, len(name), name


def sample_specs(size: int, seed: int, exclude: set[str]) -> list[str]:
    """A seeded random sample of timm models, none of them in ``exclude``."""
    import timm

    pool = sorted(m for m in timm.list_models() if m not in exclude)
    return [f"timm:{m}" for m in random.Random(seed).sample(pool, min(size, len(pool)))]


def run_families(args: argparse.Namespace) -> Part:
    start = time.perf_counter()
    strides = parse_strides(args.stride)
    sections = []
    if args.only in (None, "tv"):
        import torchvision

        specs = _chosen([b.spec for b in list_backbones("tv:*")], args)
        result = _sweep(specs, strides, not args.no_verify, args.jobs)
        sections.append((f"torchvision {torchvision.__version__}", result, {}))
        _report("torchvision", result)
    if args.only in (None, "timm"):
        import timm

        families = {f"timm:{m}": f for f, m in timm_families().items()}
        specs = _chosen(list(families), args)
        result = _sweep(specs, strides, not args.no_verify, args.jobs)
        sections.append((f"timm {timm.__version__}: one model per family", result, families))
        _report("timm families", result)
    return Part("families", tuple(sections), time.perf_counter() - start, args.jobs)


def run_all(args: argparse.Namespace) -> Part:
    import timm

    start = time.perf_counter()
    specs = _chosen([f"timm:{m}" for m in timm.list_models()], args)
    result = _sweep(specs, [16], False, args.jobs)
    _report("timm, every model", result)
    title = f"timm {timm.__version__}: every model at 1/16, meta device"
    return Part("all", ((title, result, {}),), time.perf_counter() - start, args.jobs)


def run_sample(args: argparse.Namespace) -> Part:
    import timm

    start = time.perf_counter()
    exclude = set(timm_families().values())
    specs = _chosen(sample_specs(args.sample, args.seed, exclude), args)
    target = [f"32x8:{CHANNELS}"]
    result = _sweep(specs, [8, 16], True, args.jobs, target)  # verified: what it is for
    _report("timm sample", result)
    title = f"timm {timm.__version__}: a random sample of {len(specs)} (seed {args.seed})"
    return Part("sample", ((title, result, {}),), time.perf_counter() - start, args.jobs)


def _chosen(specs: list[str], args: argparse.Namespace) -> list[str]:
    """The specs that match ``--models`` (any of its patterns), the first ``--limit``."""
    if args.models:
        patterns = args.models.split(",")
        specs = [s for s in specs if any(fnmatch.fnmatch(s, p) for p in patterns)]
    return specs[: args.limit]


def _sweep(
    specs: Sequence[str],
    strides: Sequence[int],
    verify: bool,
    jobs: int,
    targets: Sequence[str] = (),
) -> Matrix:
    done = [0]

    def progress(finished: int, total: int, spec: str | None) -> None:
        if finished > done[0] or spec is None:
            print(f"  {finished}/{total}" + (f", next {spec}" if spec else ""), flush=True)
            done[0] = finished

    return matrix(
        list(specs),
        strides=strides,
        channels=CHANNELS,
        verify=verify,
        jobs=jobs,
        targets=list(targets) or None,
        progress=progress,
    )


def _report(what: str, result: Matrix) -> None:
    seconds = sum(r.seconds for r in result.rows)
    print(
        f"{what}: {result.passed} of {result.cnns} backbones reach every target, "
        f"{result.partly} every target not refused as of one input size, "
        f"{len(result.rows) - result.cnns} refused, {len(result.failed)} failed; "
        f"{seconds:.1f} s of work, {seconds / max(1, len(result.rows)):.1f} s per model",
        flush=True,
    )
    slowest = sorted(result.rows, key=lambda r: -r.seconds)[:3]
    print("  slowest: " + ", ".join(f"{r.spec} {r.seconds:.1f} s" for r in slowest))
    for reason, n in reasons(result).most_common():
        print(f"  {n:4d}  {reason}")


def reasons(result: Matrix) -> Counter[str]:
    """How many rows and cells failed for each few-word reason."""
    found: Counter[str] = Counter()
    for r in result.rows:
        if r.reason:
            found[r.reason] += 1
        for c in r.cells:
            if not c.ok:
                found[c.reason] += 1
    return found


def markdown(part: Part) -> str:
    """A part's sections: the families and the sample with a row per model, the whole
    timm list (a thousand rows) with its summary and failures only."""
    out = []
    for title, result, families in part.sections:
        if part.name != "all":  # a row per model
            out.append(matrix_markdown(title, result, families))
            continue
        failures = [f"- `{r.spec}`: {r.detail}" for r in result.rows if r.reason] + [
            f"- `{r.spec}` 1/{c.stride}: {c.detail}"
            for r in result.rows
            for c in r.cells
            if not c.ok
        ]
        out.append(
            "\n".join([f"## {title}", "", matrix_summary(result) + ".", "", *failures]) + "\n"
        )
    out.append(_timing(part))
    return "\n".join(out)


def _timing(part: Part) -> str:
    results = [m for _, m, _ in part.sections]
    per_model = sum(r.seconds for m in results for r in m.rows) / max(1, part.rows)
    tally = Counter[str]()
    for m in results:
        tally.update(reasons(m))
    lines = [
        f"{part.rows} models in {part.seconds / 60:.1f} minutes with {part.jobs or 'all'} "
        f"job(s); {per_model:.1f} s of work per model.",
    ]
    if tally:
        lines += ["", "Failures by reason:", ""]
        lines += [f"- {reason}: {n}" for reason, n in tally.most_common()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS)
    )
    parser.add_argument("--only", choices=("tv", "timm"), help="families: one package only")
    parser.add_argument("--stride", default="16,32", help="families: target strides")
    parser.add_argument("--no-verify", action="store_true", help="families: meta only")
    parser.add_argument("--sample", type=int, default=100, help="sample: how many models")
    parser.add_argument("--seed", type=int, default=0, help="sample: the random seed")
    parser.add_argument("--limit", type=int, default=None, help="the first N models a part")
    parser.add_argument("--models", help="only the specs matching these patterns, e.g. *resnet*")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (0: a core each)")
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "docs" / "coverage.md"))
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    runs: dict[str, Callable[[argparse.Namespace], Part]] = {
        "families": run_families,
        "all": run_all,
        "sample": run_sample,
    }
    done: list[Part] = []
    for name in (p for p in PARTS if p in parts):
        done.append(runs[name](args))
        write(Path(args.out), done)  # after each part: a sweep stopped later keeps these
    print(f"wrote {args.out}")


def write(out: Path, done: list[Part]) -> None:
    minutes = sum(p.seconds for p in done) / 60
    header = (
        "# Coverage\n\n"
        "Written by `python benchmarks/coverage.py` (do not edit by hand): every model is built "
        "with random weights, inspected and fitted on the meta device; where verified, the "
        "winning plan is emitted to a file and verified by round trip (import it, load the "
        "weights, compare outputs at three sizes and check the size rule at twelve, skipping "
        "sizes the source backbone itself fails at), as `bbswap matrix` does.\n\n"
        f"Parts: {', '.join(p.name for p in done)}; {CHANNELS} channels, ceil or floor rounding "
        "(the rule each winner follows is shown). "
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{minutes:.0f} minutes on this machine.\n"
    )
    body = "\n".join(markdown(p) for p in done)
    out.write_text(header + "\n" + body, encoding="utf-8")


if __name__ == "__main__":
    main()
