"""Put an evaluation's ``summary.md`` table into the README between its two markers (``make examples``).

    python docs/splice_table.py SUMMARY_MD README_MD
"""
from __future__ import annotations

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


if __name__ == "__main__":
    summary, readme = map(Path, sys.argv[1:3])
    readme.write_text(splice(summary.read_text(), readme.read_text()))
