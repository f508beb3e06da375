"""Coverage sweep: every torchvision model and one model per timm CNN family through
inspect -> fit -> emit -> verify, written to docs/coverage.md.

    python benchmarks/coverage.py                 # the whole sweep (about an hour on 2 cores)
    python benchmarks/coverage.py --only tv       # torchvision only
    python benchmarks/coverage.py --stride 8,16,32 --no-verify   # meta-device fits only

It runs ``bbswap matrix`` (the library call) and needs torchvision and timm installed;
each backbone is built with random weights, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from bbswap.cli.render import matrix_markdown
from bbswap.parsing import parse_strides
from bbswap.search.matrix import matrix

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
    # transformers and hybrids: refused, by design
    "edgenext": "edgenext_xx_small",
    "efficientvit (MIT)": "efficientvit_b0",
    "vit": "vit_tiny_patch16_224",
    "swin": "swin_tiny_patch4_window7_224",
    "maxvit": "maxvit_tiny_tf_224",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("tv", "timm"), help="sweep one package only")
    parser.add_argument("--stride", default="16", help="target strides, e.g. 8,16,32")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--no-verify", action="store_true", help="meta-device fits only")
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "docs" / "coverage.md"))
    args = parser.parse_args()
    strides = parse_strides(args.stride)
    sections = []
    start = time.perf_counter()
    if args.only in (None, "tv"):
        import torchvision

        result = matrix("tv:*", strides=strides, channels=args.channels, verify=not args.no_verify)
        sections.append((f"torchvision {torchvision.__version__}", result, {}))
        print(f"torchvision: {result.passed} of {len(result.rows)}", flush=True)
    if args.only in (None, "timm"):
        import timm

        specs = [f"timm:{m}" for m in TIMM_FAMILIES.values()]
        families = {f"timm:{m}": f for f, m in TIMM_FAMILIES.items()}
        result = matrix(specs, strides=strides, channels=args.channels, verify=not args.no_verify)
        sections.append((f"timm {timm.__version__}", result, families))
        print(f"timm: {result.passed} of {len(result.rows)}", flush=True)
    minutes = (time.perf_counter() - start) / 60
    header = (
        "# Coverage\n\n"
        "Written by `python benchmarks/coverage.py` (do not edit by hand): every model is built "
        "with random weights, inspected and fitted on the meta device, then the winning plan "
        "is emitted to a file and verified by round trip (import it, load the weights, compare "
        "outputs at three sizes and check the size rule at twelve, skipping sizes the source "
        "backbone itself fails at), as `bbswap matrix` does.\n\n"
        f"Target: {args.channels} channels at 1/{', 1/'.join(map(str, strides))}, ceil or floor "
        "rounding (the rule each winner follows is shown). "
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{minutes:.0f} minutes on this machine.\n"
    )
    body = "\n".join(matrix_markdown(title, r, families) for title, r, families in sections)
    Path(args.out).write_text(header + "\n" + body, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
