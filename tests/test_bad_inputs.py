"""Issue 14 acceptance: every bad input of tests/bad_inputs_rows.py, across train, segment, evaluate,
report and correspond, ends with exit status 2 and one line `atlasreg: error: <file>: <problem>` on
stderr naming the row's file or key, no traceback, and nothing created, changed or left behind (no
output folder for a fresh --out, an existing --out untouched, no .tmp- entries). Except (issue 16
item 3) a `segment` input that cannot be read fails alone: exit status 1, its line and the summary
line, the case failed in the case manifest with that message, the good inputs written. The same rows
make the table of docs/results.md (benchmarks/bad_inputs.py)."""

import dataclasses

from collections import Counter
from pathlib import Path

import pytest

from bad_inputs_rows import ROWS, Row, correspond_argv, make_material, problems, run_row

COMMANDS = {"train", "segment", "evaluate", "report", "correspond"}


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """The valid inputs every row starts from: one tiny model trained once for the module."""
    return make_material(tmp_path_factory.mktemp("bad_inputs_material"))


def _param(row: Row):
    marks = [pytest.mark.xfail(strict=True, reason=row.defect)] if row.defect else []
    return pytest.param(row, id=row.id, marks=marks)


@pytest.mark.parametrize("row", [_param(r) for r in ROWS])
def test_bad_input_is_one_line_with_status_2_and_leaves_nothing_behind(material, tmp_path, row):
    res = run_row(row, material, tmp_path / "row")
    found = problems(res)
    assert not found, f"{row.id}: {'; '.join(found)}\nstderr:\n{res.stderr}"


def test_the_table_has_at_least_45_distinct_rows_over_the_five_commands():
    counts = Counter(r.command for r in ROWS)
    assert set(counts) == COMMANDS and min(counts.values()) >= 5, counts
    assert len(ROWS) >= 45 and len({r.id for r in ROWS}) == len(ROWS)


def test_the_harness_sees_a_success_a_traceback_and_a_message_naming_another_file(material, tmp_path,
                                                                                     monkeypatch):
    """The checks are not vacuous: a valid command line (exit 0, a file written), a command that
    raises (a traceback, exit 1) and an error naming another file than the row's are all reported."""
    valid = Row("correspond", "valid points", lambda m, d: (correspond_argv(m, d / "o.csv"), "points.csv"))
    res = run_row(valid, material, tmp_path / "valid")
    assert res.status == 0 and (tmp_path / "valid" / "o.csv").is_file()
    found = problems(res)
    assert "exit status 0" in found and "files left behind: +o.csv" in found, found

    import atlasreg.correspondence

    def crash(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(atlasreg.correspondence, "map_points_csv", crash)
    res = run_row(valid, material, tmp_path / "crash")
    found = problems(res)
    assert res.status == 1 and "a traceback" in found and "ValueError: boom" in res.stderr, found

    def named_elsewhere(m, d):
        (d / "p.csv").write_text("x,y\n1,abc\n")
        return correspond_argv(m, d / "o.csv", points=d / "p.csv"), "other.csv"

    monkeypatch.undo()
    res = run_row(Row("correspond", "names p.csv", named_elsewhere), material, tmp_path / "named")
    assert problems(res) == ["the message does not name other.csv"], problems(res)
    assert Path(res.message.split(": ")[2]).name == "p.csv"


def test_the_harness_checks_what_a_case_that_fails_alone_did(material, tmp_path):
    """A row whose input fails alone passes, and the same run reported with another exit status, with
    a case folder it did not write, or without its manifest, does not."""
    r = next(r for r in ROWS if r.fails_alone == ("B101_img",))
    res = run_row(r, material, tmp_path / "row")
    assert problems(res) == []
    assert "exit status 2" in problems(dataclasses.replace(res, status=2))
    assert "case folders written: ['B101_img'], expected []" in problems(dataclasses.replace(res, fails_alone=()))
    (res.out / "segment_manifest.csv").unlink()
    assert "no segment_manifest.csv" in problems(res)
