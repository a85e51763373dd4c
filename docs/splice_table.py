"""Put evaluations' ``summary.md`` tables into the README between its two markers (``make examples``), each
headed by the model it measured (read from the evaluation's ``summary.json``).

    python docs/splice_table.py README_MD SUMMARY_MD [SUMMARY_MD ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- evaluation-table:start -->", "<!-- evaluation-table:end -->"


def splice(table: str, document: str) -> str:
    """``document`` with everything between the markers replaced by ``table``."""
    head, found, rest = document.partition(START)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise SystemExit(f"the README has no {START} … {END} markers")
    return f"{head}{START}\n{table.strip()}\n{END}{tail}"


def headed_tables(summaries: list[Path]) -> str:
    """Each ``summary.md`` under a line naming its model."""
    parts = []
    for summary in summaries:
        model = json.loads((summary.parent / "summary.json").read_text())["evaluation"]["model"]["name"]
        parts.append(f"**{model}**\n\n{summary.read_text().strip()}")
    return "\n\n".join(parts)


if __name__ == "__main__":
    readme, *summaries = map(Path, sys.argv[1:])
    readme.write_text(splice(headed_tables(summaries), readme.read_text()))
