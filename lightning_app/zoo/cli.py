"""``python -m converters {list,convert,verify,manifest,evaluate}``: the converter's command line, on the zoo.

The one front end that looks models up in the zoo; the ``converters`` library itself never
imports ``lightning_app`` (``converters/__main__.py`` only forwards here).
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from lightning_app.entry import debug_requested, format_user_error
from lightning_app.errors import ConfigError, UserError

README_START = "<!-- zoo-table:start (generated: python -m converters list --update-readme) -->"
README_END = "<!-- zoo-table:end -->"
#: the README at the repository root (an editable install runs from the checkout)
README = Path(__file__).resolve().parents[2] / "README.md"


def _variants_text(name: str, limit: int = 4) -> str:
    from lightning_app.zoo.registry import variants_of

    names = variants_of(name)
    if len(names) <= limit:
        return ", ".join(names)
    return f"{len(names)}: {', '.join(names[:limit])}, ..."


def zoo_table_markdown() -> str:
    """The README zoo table, generated from the registry."""
    from lightning_app.zoo.registry import REGISTRY, list_models

    rows = ["| Keras model | timm architecture | size | preprocessing | Keras top-1 | parity | variants |",
            "|---|---|---|---|---|---|---|"]
    for name in list_models():
        e = REGISTRY[name]
        mode = e.mode + (" (built in)" if e.builtin_preprocessing else "")
        top1 = "" if e.top1 is None else f"{e.top1:.1f}"
        parity = (("float32 + float64" if e.parity_float64 else "float32") if e.parity
                  else "float64" if e.parity_float64 else "-")
        variants = _variants_text(name)
        rows.append(f"| {name} | `{e.timm_arch}` | {e.input_size} | {mode} | {top1} | {parity} | {variants} |")
    return "\n".join(rows)


def readme_with_table(text: str) -> str:
    """``text`` with the block between the zoo-table markers replaced by the generated table."""
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise ConfigError(f"the README has no zoo table markers ({README_START} ... {README_END})")
    return pattern.sub(lambda _: f"{README_START}\n{zoo_table_markdown()}\n{README_END}", text)


def _cmd_list(args: argparse.Namespace) -> int:
    from lightning_app.zoo.registry import REGISTRY, list_models

    if args.update_readme:
        path = Path(args.update_readme)
        text = path.read_text()
        new = readme_with_table(text)
        if new != text:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(new)
            tmp.replace(path)
        print(f"{path}: zoo table {'updated' if new != text else 'already up to date'}")
        return 0
    if args.markdown:
        print(zoo_table_markdown())
        return 0
    names = list_models(variants=args.variants)
    width = max(len(n) for n in names) + 1
    header = (f"{'model':<{width}} {'timm architecture':<27} {'size':>4}  {'mode':<6} {'top-1':>5}  "
              f"files (top | notop){'' if args.variants else '  [variants]'}")
    print(header)
    print("-" * len(header))
    for name in names:
        e = REGISTRY[name]
        top1 = "" if e.top1 is None else f"{e.top1:.1f}"
        variants = "" if args.variants or not (v := _variants_text(name)) else f"  [{v}]"
        print(f"{name:<{width}} {e.timm_arch:<27} {e.input_size:>4}  {e.mode:<6} {top1:>5}  "
              f"{e.top.filename} | {e.notop.filename}{variants}")
    print(f"\n{len(list_models())} models, {len(REGISTRY)} entries counting variants"
          + ("" if args.variants else " (python -m converters list --variants)"))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from converters.convert import convert, save_converted
    from lightning_app.zoo.registry import get_entry

    converted = convert(get_entry(args.model), args.h5)
    out = save_converted(converted, args.out)
    kind = "top" if converted.include_top else "notop"
    print(f"converted {args.h5} ({converted.metadata['source_layout']}, {kind}) -> {out} "
          f"[{len(converted.state_dict)} tensors, sha256 of source {converted.metadata['source_sha256'][:12]}...]")
    return 0


def load_zoo_model(entry, converted_path: Path, include_top: bool):
    """The parity harness's model loader: ours through the public entry point, ``create_backbone``."""
    from lightning_app.zoo.factory import create_backbone

    return create_backbone(entry.keras_name, weights=converted_path, num_classes=None if include_top else 0)


def _cmd_verify(args: argparse.Namespace) -> int:
    from converters import parity
    from lightning_app.zoo.registry import get_entry

    entry = get_entry(args.model)
    if args.h5 and args.float64:
        raise ConfigError("--float64 checks random weights made here; it does not combine with --h5")
    if args.h5:
        reports = [parity.verify_file(entry, args.h5, args.size, load_model=load_zoo_model)]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            reports = parity.run_random_parity(entry, tmp, args.size, load_model=load_zoo_model,
                                               float64=args.float64)
    for report in reports:
        print(report)
    return 0 if all(r.ok for r in reports) else 1


def _cmd_manifest(args: argparse.Namespace) -> int:
    from converters.manifest import write_manifest
    from lightning_app.zoo.registry import get_entry, list_models

    for name in args.model or list_models(variants=True):
        entry = get_entry(name)
        if entry.manifest != entry.keras_name and not args.model:
            continue  # a size variant: its model's manifest serves it
        print(write_manifest(entry))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from lightning_app.zoo.evaluate import evaluate, format_result

    result = evaluate(args.model, args.data, class_index=args.class_index, weights=args.weights, size=args.size,
                      crop_pct=args.crop_pct, batch_size=args.batch_size, workers=args.workers, device=args.device)
    print(format_result(result))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    import lightning_app.zoo  # noqa: F401  (registers the families)

    parser = argparse.ArgumentParser(prog="python -m converters", description="Keras Applications weights -> timm.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="models, input sizes, preprocessing modes, official files and variants")
    p.add_argument("--variants", action="store_true", help="one row per variant (other alphas, sizes, ...)")
    p.add_argument("--markdown", action="store_true", help="print the README zoo table")
    p.add_argument("--update-readme", nargs="?", const=str(README), default=None, metavar="README",
                   help="rewrite the zoo table in the README (default: the repository's README.md)")
    p = sub.add_parser("convert", help="Keras .h5 / .weights.h5 -> timm .safetensors")
    p.add_argument("--model", required=True)
    p.add_argument("--h5", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p = sub.add_parser("verify", help="parity report against Keras (needs keras; KERAS_BACKEND=torch)")
    p.add_argument("--model", required=True)
    p.add_argument("--h5", type=Path, help="a Keras weight file; default: random weights made here")
    p.add_argument("--size", type=int, default=None, help="input size (default: the model's native size)")
    p.add_argument("--float64", action="store_true",
                   help="also run Keras and ours in float64 on the same random weights (tolerance 1e-9)")
    p = sub.add_parser("manifest", help="regenerate layer manifests from Keras (developers)")
    p.add_argument("--model", action="append", help="zoo name (repeatable); default: every model")
    p = sub.add_parser("evaluate",
                       help="ImageNet top-1 / top-5 on a validation folder, beside Keras's published figures")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, type=Path,
                   help="folder with one subfolder per class (WordNet id or index)")
    p.add_argument("--class-index", type=Path, default=None,
                   help="Keras's imagenet_class_index.json (default: Keras's cached copy, if any)")
    p.add_argument("--weights", default="imagenet",
                   help="'imagenet' (default), a converted .safetensors or a Keras .h5")
    p.add_argument("--size", type=int, default=None, help="input size (default: the model's native size)")
    p.add_argument("--crop-pct", type=float, default=0.875,
                   help="centre crop / resized shorter side (default 0.875)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4, help="image decoding processes (default 4)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or LIGHTNING_APP_DEBUG=1)")
    args = parser.parse_args(argv)
    commands = {"list": _cmd_list, "convert": _cmd_convert, "verify": _cmd_verify, "manifest": _cmd_manifest,
                "evaluate": _cmd_evaluate}
    try:
        return commands[args.command](args)
    except (UserError, FileNotFoundError, ImportError) as err:
        if args.debug or debug_requested():
            raise
        print(format_user_error(err) if isinstance(err, UserError) else f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from lightning_app.entry import run

    sys.exit(run(main))
