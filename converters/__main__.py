"""python -m converters {list,convert,verify,manifest}."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from lightning_app.entry import debug_requested, format_user_error, run
from lightning_app.errors import UserError


def _cmd_list(args: argparse.Namespace) -> int:
    from lightning_app.zoo.registry import REGISTRY

    header = f"{'model':<18} {'timm architecture':<27} {'size':>4}  {'mode':<6} files (top | notop)"
    print(header)
    print("-" * len(header))
    for e in REGISTRY.values():
        print(f"{e.keras_name:<18} {e.timm_arch:<27} {e.input_size:>4}  {e.mode:<6} {e.top.filename} | {e.notop.filename}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from converters.convert import convert, save_converted

    converted = convert(args.model, args.h5)
    out = save_converted(converted, args.out)
    kind = "top" if converted.include_top else "notop"
    print(f"converted {args.h5} ({converted.metadata['source_layout']}, {kind}) -> {out} "
          f"[{len(converted.state_dict)} tensors, sha256 of source {converted.metadata['source_sha256'][:12]}...]")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from converters import parity
    from lightning_app.zoo.registry import get_entry

    entry = get_entry(args.model)
    if args.h5:
        reports = [parity.verify_file(entry, args.h5, args.size)]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            reports = parity.run_random_parity(entry, tmp, args.size)
    for report in reports:
        print(report)
    return 0 if all(r.ok for r in reports) else 1


def _cmd_manifest(args: argparse.Namespace) -> int:
    from converters.manifest import write_manifest
    from lightning_app.zoo.registry import get_entry, list_models

    for name in args.model or list_models():
        print(write_manifest(get_entry(name)))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m converters", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="models, input sizes, preprocessing modes and official files")
    p = sub.add_parser("convert", help="Keras .h5 / .weights.h5 -> timm .safetensors")
    p.add_argument("--model", required=True)
    p.add_argument("--h5", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p = sub.add_parser("verify", help="parity report against Keras (needs keras; KERAS_BACKEND=torch)")
    p.add_argument("--model", required=True)
    p.add_argument("--h5", type=Path, help="a Keras weight file; default: random weights made here")
    p.add_argument("--size", type=int, default=None, help="input size (default: the model's native size)")
    p = sub.add_parser("manifest", help="regenerate layer manifests from Keras (developers)")
    p.add_argument("--model", action="append")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or LIGHTNING_APP_DEBUG=1)")
    args = parser.parse_args(argv)
    commands = {"list": _cmd_list, "convert": _cmd_convert, "verify": _cmd_verify, "manifest": _cmd_manifest}
    try:
        return commands[args.command](args)
    except (UserError, FileNotFoundError, ImportError) as err:
        if args.debug or debug_requested():
            raise
        print(format_user_error(err) if isinstance(err, UserError) else f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run(main))
