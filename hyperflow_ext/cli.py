"""The ``hyperflow`` command line.

Exit codes: 0 success, 1 failure (one line on stderr; traceback with ``-v``), 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from typing import Callable, Dict, List, Optional

logger = logging.getLogger("hyperflow")


class CLIError(Exception):
    """A failure to report as one line on stderr with exit code 1."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging; tracebacks on error")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--cache-dir", default=None, help="cache folder (default $HYPERFLOW_CACHE or ~/.cache/hyperflow)")
    p.add_argument("--out", default=None, help="output path or folder")


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import hyperflow_ext as hf

    info = {"hyperflow": hf.__version__, "python": platform.python_version(),
            "platform": platform.platform(), **hf.native.diagnostics(),
            "cache_dir": str(hf.cache_dir(args.cache_dir))}
    usable = ["torch"]
    if hf.native.available():
        usable.append("native (cpu)")
    if hf.native.cuda_available():
        usable.append("native (cuda)")
    if hf.native.triton_available():
        usable.append("triton (cuda)" if torch.cuda.is_available() else "triton (interpreter only: TRITON_INTERPRET=1)")
    info["backends_usable"] = usable
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperflow", description="Flow methods for PyTorch models: "
                                     "gradient-free few-shot adaptation (HyperFlow) and pruning by flow (Hyperflows).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    commands: Dict[str, Callable[[argparse.Namespace], int]] = {}

    p = sub.add_parser("info", help="version, torch, native build (CPU/CUDA), usable back-ends")
    _common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    commands["info"] = cmd_info

    parser.set_defaults(_commands=commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad usage
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s")
    try:
        return args._commands[args.command](args)
    except KeyboardInterrupt:
        print("hyperflow: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line; the traceback only when asked for
        if args.verbose:
            raise
        print(f"hyperflow {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
