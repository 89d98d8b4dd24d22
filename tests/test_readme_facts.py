"""The README's prose numbers (rows, commits, machine) are what `bench report` writes
into its marked blocks from the stored records: a stale number fails here."""
from pathlib import Path

import pytest

from bench.report.readme import facts, readme_blocks, render, update_readme
from bench.report.records import usable_records
from bench.errors import BenchError

REPO = Path(__file__).resolve().parent.parent


def test_readme_blocks_match_what_bench_report_would_write():
    records, _ = usable_records(str(REPO / "results"))
    if not records:
        pytest.skip("no stored records under results/")
    blocks = readme_blocks((REPO / "README.md").read_text())
    assert {"synthetic-facts", "idd-lite-facts"} <= set(blocks)
    expected = facts(records)
    for name, text in blocks.items():
        assert text == expected[name], f"README block {name} is stale: run `bench report`"


def test_update_rewrites_only_the_blocks_and_refuses_a_block_without_records(tmp_path):
    recs = [{"dataset": "toy", "method": m, "git_commit": c, "device_name": "CPU X", "threads": 2,
             "precision": "fp32"} for m, c in (("baseline", "abcdef123"), ("paumer", "0123456789"))]
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- BEGIN bench-report:toy-facts -->\nold 72 rows\n<!-- END bench-report:toy-facts -->\n"
                      "after\n")
    assert update_readme(readme, recs)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("<!-- END bench-report:toy-facts -->\nafter\n")
    assert readme_blocks(text) == {"toy-facts": "The full table has 2 rows (2 methods: baseline, paumer), measured "
                                                "at 2 commits (0123456, abcdef1) on CPU X, 2 threads, fp32."}
    assert not update_readme(readme, recs)  # nothing new: the file is left as it is
    assert render("no blocks\n", facts(recs)) == "no blocks\n"
    readme.write_text("<!-- BEGIN bench-report:other-facts -->\n<!-- END bench-report:other-facts -->\n")
    with pytest.raises(BenchError, match="other-facts that no stored records fill"):
        update_readme(readme, recs)


def test_a_report_into_another_folder_leaves_the_readme_alone(tmp_path, monkeypatch):
    from bench.cli import main

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "toy.jsonl").write_text((REPO / "results" / "synthetic.jsonl").read_text().splitlines()[0]
                                                     + "\n")
    before = "<!-- BEGIN bench-report:synthetic-facts -->\nold\n<!-- END bench-report:synthetic-facts -->\n"
    (tmp_path / "README.md").write_text(before)
    monkeypatch.chdir(tmp_path)
    main(["report", "--out", str(tmp_path / "scratch")])
    assert (tmp_path / "scratch" / "synthetic.md").is_file()
    assert (tmp_path / "README.md").read_text() == before  # only --out was written
