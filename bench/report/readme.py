"""Prose numbers of the README (row counts, commits, machine), written by ``bench report``
between markers so that they cannot go stale:

    <!-- BEGIN bench-report:<dataset>-facts -->
    ...
    <!-- END bench-report:<dataset>-facts -->

``facts(records)`` says what goes in each block; ``update_readme`` rewrites the blocks a
file has (and only those), leaving every other byte as it was."""
from __future__ import annotations

import re
from pathlib import Path

from bench.errors import BenchError
from bench.fileio import atomic_write
from bench.results import record_precision

BLOCK = re.compile(r"(<!-- BEGIN bench-report:([\w.-]+) -->\n)(.*?)(<!-- END bench-report:\2 -->)", re.S)


def _commits(records: list[dict]) -> str:
    commits = sorted({str(r.get("git_commit"))[:7] for r in records if r.get("git_commit")})
    return (f"{len(commits)} commit{'s' if len(commits) != 1 else ''} ({', '.join(commits)})" if commits
            else "no recorded commit")


def _machine(records: list[dict]) -> str:
    names = sorted({str(r.get("device_name") or r.get("device")) for r in records})
    threads = sorted({int(r["threads"]) for r in records if isinstance(r.get("threads"), int)})
    precisions = sorted({str(record_precision(r)) for r in records if record_precision(r)})
    torch = sorted({str((r.get("versions") or {}).get("torch")) for r in records if r.get("versions")})
    text = "/".join(names)
    if threads and not any("NVIDIA" in n for n in names):
        text += f", {'/'.join(map(str, threads))} thread{'s' if threads != [1] else ''}"
    if precisions:
        text += f", {'/'.join(precisions)}"
    if torch:
        text += f", torch {'/'.join(torch)}"
    return text


def facts(records: list[dict]) -> dict[str, str]:
    """Block name -> its text, one block per dataset: how many rows (records) of how many
    methods, at how many commits, on which machine."""
    blocks = {}
    for dataset in sorted({r["dataset"] for r in records}):
        mine = [r for r in records if r["dataset"] == dataset and "study" not in r]
        if not mine:
            continue
        methods = sorted({r["method"] for r in mine})
        blocks[f"{dataset}-facts"] = (
            f"The full table has {len(mine)} rows ({len(methods)} methods: {', '.join(methods)}), "
            f"measured at {_commits(mine)} on {_machine(mine)}.")
    return blocks


def render(text: str, blocks: dict[str, str]) -> str:
    """``text`` with every marked block whose name is in ``blocks`` replaced by its text."""
    def fill(m: re.Match) -> str:
        name = m.group(2)
        return m.group(0) if name not in blocks else f"{m.group(1)}{blocks[name]}\n{m.group(4)}"

    return BLOCK.sub(fill, text)


def readme_blocks(text: str) -> dict[str, str]:
    """The marked blocks of ``text``: name -> content (without its final newline)."""
    return {m.group(2): m.group(3).rstrip("\n") for m in BLOCK.finditer(text)}


def update_readme(path: Path, records: list[dict]) -> bool:
    """Rewrites the marked blocks of ``path`` from ``records``; True if it changed. A file
    without blocks is left alone; a block the records cannot fill is a BenchError (a
    README that names a dataset with no rows)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    blocks = facts(records)
    unknown = sorted(set(readme_blocks(text)) - set(blocks))
    if unknown:
        raise BenchError(f"{path} has block(s) {', '.join(unknown)} that no stored records fill; "
                         f"expected one of: {', '.join(sorted(blocks)) or 'none'}")
    new = render(text, blocks)
    if new == text:
        return False
    atomic_write(path, lambda f: f.write(new.encode("utf-8")))
    return True
