"""Print the tables of benchmark JSON files (``--json`` of extract / head / finetune / robustness), with their
environment and notes; a run that was cut short still shows the rows it finished.

Usage: python benchmarks/summarize.py out/*.json [--markdown summary.md]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List


def summarize(doc: Dict[str, Any]) -> str:
    lines: List[str] = [f"## {doc.get('benchmark', '?')}"]
    host = doc.get("host", {})
    lines.append(f"host: {host.get('platform', '?')}, {host.get('cpus', '?')} CPUs, started {host.get('started', '?')}")
    for runner, env in doc.get("env", {}).items():
        lines.append(f"{runner}: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    tables = doc.get("tables") or {}
    if tables:
        lines += list(tables.values())
    else:  # cut short before the table: show what finished
        lines.append("(no table: the run was cut short; finished rows)")
        for r in doc.get("rows", []):
            shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                     if not isinstance(v, (list, dict)) and k not in ("traceback", "log_tail", "log")}
            lines.append("- " + json.dumps(shown))
        lines += [f"- {n}" for n in doc.get("notes", [])]
    errors = [r for r in doc.get("rows", []) if "error" in r]
    for r in errors:
        lines.append(f"error ({r.get('runner')}, {r.get('model', r.get('case', ''))}): {r['error']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--markdown", type=Path, default=None, help="also write the summary here")
    args = p.parse_args()
    parts = []
    for f in args.files:
        try:
            parts.append(summarize(json.loads(f.read_text())))
        except (OSError, ValueError) as err:
            parts.append(f"## {f.name}\nunreadable: {err}\n")
    text = "\n".join(parts)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
