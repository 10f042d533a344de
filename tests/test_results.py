"""Results file and journal: commit, rotation, and recovery from torn or interrupted states."""

import json
import os

import pytest
import structlog

from tests.conftest import strictly_valid
from watcher.results import JOURNAL_SHARE, JournalError, ResultStore, encode_results, numbered


def rec(key, label="female"):
    return {"key": key, "status": "done", "label": label, "source": f"/in/{key}", "dest": f"/done/{key}"}


def store_in(tmp_path, max_bytes=10_000):
    return ResultStore(tmp_path / "process_results.json", tmp_path / "journal.jsonl", max_bytes)


def stopped_after(tmp_path, records, max_bytes=10_000):
    """A store that committed `records` and was closed, as a service that stopped."""
    s = store_in(tmp_path, max_bytes)
    s.recover()
    s.commit(records)
    s.close()
    return s


def test_commit_appends_journal_and_rewrites_results(tmp_path):
    s = store_in(tmp_path)
    assert s.recover() == []
    assert json.loads(s.results.read_text()) == {}
    s.commit([rec("a.jpg"), rec("b.jpg", "male"), {"key": "c.jpg", "status": "failed", "reason": "x"}])
    assert json.loads(s.results.read_text()) == {"a.jpg": "female", "b.jpg": "male"}
    assert len(s.journal.read_text().splitlines()) == 3
    s.close()


def test_recover_rebuilds_results_from_the_journal(tmp_path):
    s = stopped_after(tmp_path, [rec("a.jpg")])
    s.results.write_text("{}")  # as if the crash came between journal fsync and results replace
    again = store_in(tmp_path)
    assert [r["key"] for r in again.recover()] == ["a.jpg"]
    assert json.loads(again.results.read_text()) == {"a.jpg": "female"}


def test_a_torn_journal_tail_is_cut_and_kept_beside_it(tmp_path):
    s = stopped_after(tmp_path, [rec("a.jpg")])
    with open(s.journal, "ab") as f:
        f.write(b'{"key": "b.jpg", "sta')
    again = store_in(tmp_path)
    with structlog.testing.capture_logs() as logs:
        assert [r["key"] for r in again.recover()] == ["a.jpg"]
    assert s.journal.read_bytes().endswith(b"}\n")
    (kept,) = tmp_path.glob("journal.jsonl.torn-*")
    assert kept.read_bytes() == b'{"key": "b.jpg", "sta'
    assert [(e["event"], e["bytes"], e["kept_in"]) for e in logs] == [("journal_tail_cut", 21, str(kept))]


@pytest.mark.parametrize("damage", ["cut short", "NUL-filled tail", "emptied", "deleted", "deleted after a rotation"])
def test_a_journal_that_lost_committed_answers_is_refused_and_left_as_it_is(tmp_path, damage):
    s = store_in(tmp_path, max_bytes=20 if damage == "deleted after a rotation" else 10_000)
    s.recover()
    if damage == "deleted after a rotation":
        s.commit([rec("old.jpg")])
        assert s.rotate_if_full() == 1
    s.commit([rec("a.jpg"), rec("b.jpg")])
    s.commit([rec("c.jpg", "male")])
    s.close()
    size = s.journal.stat().st_size
    if damage == "cut short":
        os.truncate(s.journal, size - 10)
    elif damage == "NUL-filled tail":
        with open(s.journal, "r+b") as f:
            f.seek(size - 60)
            f.write(b"\0" * 60)
    elif damage == "emptied":
        os.truncate(s.journal, 0)
    else:
        s.journal.unlink()
    damaged = s.journal.read_bytes() if s.journal.exists() else None
    lacking = r"journal.jsonl lacks \d of the answers in .*process_results.json \(the first: '[ac].jpg'\)"
    with pytest.raises(JournalError, match=lacking):
        store_in(tmp_path).recover()
    assert (s.journal.read_bytes() if s.journal.exists() else None) == damaged  # nothing cut
    assert json.loads(s.results.read_text()) == {"a.jpg": "female", "b.jpg": "female", "c.jpg": "male"}
    assert not list(tmp_path.glob("*.torn-*"))


def test_a_line_of_nul_bytes_is_named_as_such(tmp_path):
    s = stopped_after(tmp_path, [rec("a.jpg")])
    with open(s.journal, "ab") as f:
        f.write(b"\0" * 40 + b"\n")
    with pytest.raises(JournalError, match=r"line 2: not a journal record .*40 NUL bytes as a power cut leaves"):
        store_in(tmp_path).recover()


def test_rotation_numbers_both_files(tmp_path):
    s = store_in(tmp_path, max_bytes=30)
    s.recover()
    s.commit([rec("a.jpg"), rec("b.jpg")])
    assert s.rotate_if_full() == 1
    assert json.loads(numbered(s.results, 1).read_text()) == {"a.jpg": "female", "b.jpg": "female"}
    assert len(numbered(s.journal, 1).read_text().splitlines()) == 2
    assert json.loads(s.results.read_text()) == {} and s.journal.read_text() == ""
    s.commit([rec("c.jpg"), rec("d.jpg")])
    assert s.rotate_if_full() == 2
    s.commit([rec("e.jpg")])
    assert s.rotate_if_full() is None
    s.close()


@pytest.mark.parametrize("line", [b"not json", b"[1, 2]", b'"abc"', b'{"status": "done"}'])
def test_a_journal_line_that_is_not_a_record_is_named_with_its_line(tmp_path, line):
    s = stopped_after(tmp_path, [rec("a.jpg")])
    with open(s.journal, "ab") as f:
        f.write(line + b"\n")
    with pytest.raises(JournalError, match=r"journal.jsonl, line 2: not a journal record"):
        store_in(tmp_path).recover()


def test_a_journal_of_failed_files_rolls_over_by_itself(tmp_path):
    """Failed files add journal records but no results entries: without a limit of its own the
    journal, read whole at every start, would grow without end."""
    s = store_in(tmp_path, max_bytes=100)
    s.recover()
    failed = {"key": "x.jpg", "status": "failed", "reason": "not a readable image " + "x" * 60}
    rotated = None
    for i in range(40):
        s.commit([failed | {"key": f"x{i}.jpg"}])
        rotated = s.rotate_if_full() or rotated
    assert rotated and json.loads(s.results.read_text()) == {}
    assert s.journal.stat().st_size < JOURNAL_SHARE * 100
    s.close()


def test_rotation_never_leaves_the_results_file_missing(tmp_path, monkeypatch):
    s = store_in(tmp_path, max_bytes=30)
    s.recover()
    s.commit([rec("a.jpg"), rec("b.jpg")])
    seen = []
    real_rename = os.rename

    def rename(src, dst):  # the journal's rename, in the middle of the rotation
        seen.append(json.loads(s.results.read_text()))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    assert s.rotate_if_full() == 1
    assert seen == [{"a.jpg": "female", "b.jpg": "female"}]
    assert json.loads(s.results.read_text()) == {}
    assert json.loads(numbered(s.results, 1).read_text()) == {"a.jpg": "female", "b.jpg": "female"}
    s.close()


def test_rotation_interrupted_after_its_journal_rename_is_finished(tmp_path):
    s = stopped_after(tmp_path, [rec("a.jpg"), rec("b.jpg", "male"), rec("a.jpg", "male")], max_bytes=10)
    os.rename(s.journal, numbered(s.journal, 1))  # crash right after rotation's first step
    again = store_in(tmp_path, max_bytes=10)
    assert again.recover() == []
    assert json.loads(numbered(s.results, 1).read_text()) == {"a.jpg": "male", "b.jpg": "male"}
    assert json.loads(again.results.read_text()) == {}


def test_an_old_numbered_journal_deleted_by_hand_leaves_the_current_one_alone(tmp_path):
    s = store_in(tmp_path, max_bytes=30)
    s.recover()
    s.commit([rec("a.jpg"), rec("b.jpg")])
    assert s.rotate_if_full() == 1
    s.commit([rec("c.jpg")])
    s.close()
    numbered(s.journal, 1).unlink()  # an operator's clean-up
    again = store_in(tmp_path, max_bytes=30)
    assert [r["key"] for r in again.recover()] == ["c.jpg"]
    assert json.loads(again.results.read_text()) == {"c.jpg": "female"}


def test_results_file_is_the_indented_json_of_all_labels(tmp_path):
    s = store_in(tmp_path, max_bytes=1 << 20)
    s.recover()
    expected = {}
    batches = [[rec("a.jpg"), rec('q"uote\\.jpg', "male")], [], [rec("ünï çødé.png")], [rec("a.jpg", "male"), rec("b.jpg")]]
    for batch in batches:  # the last one labels a.jpg again: its entry is replaced, not repeated
        s.commit([*batch, {"key": "x.jpg", "status": "failed", "reason": "x"}])
        expected |= {r["key"]: r["label"] for r in batch}
        assert s.results.read_text() == json.dumps(expected, indent=1, ensure_ascii=False) + "\n"
        assert s.results.read_bytes() == encode_results(expected)  # the format --once writes
    s.close()
    assert encode_results({}) == b"{}\n"
    again = store_in(tmp_path, max_bytes=1 << 20)
    again.recover()
    assert again.results.read_text() == json.dumps(expected, indent=1, ensure_ascii=False) + "\n"


def test_a_name_that_is_not_utf8_is_written_readable_and_the_journal_keeps_its_bytes(tmp_path):
    name = os.fsdecode(b"caf\xe9.jpg")  # undecodable byte, kept by Python as a lone surrogate
    s = stopped_after(tmp_path, [rec(name), rec("b.jpg", "male")])
    assert strictly_valid(s.results.read_bytes()) == {"caf\\xe9.jpg": "female", "b.jpg": "male"}
    first = strictly_valid(s.journal.read_bytes().splitlines()[0])
    assert first["key"] == "caf\\xe9.jpg" and bytes.fromhex(first["key_hex"]) == b"caf\xe9.jpg"
    again = store_in(tmp_path)
    records = again.recover()
    assert records[0]["key"] == name and os.fsencode(records[0]["source"]) == b"/in/caf\xe9.jpg"
    assert "key_hex" not in records[0]
    assert strictly_valid(again.results.read_bytes()) == {"caf\\xe9.jpg": "female", "b.jpg": "male"}
    assert strictly_valid(encode_results({name: "male"})) == {"caf\\xe9.jpg": "male"}


def test_a_journal_write_that_fails_names_the_journal(tmp_path):
    s = store_in(tmp_path)
    s.recover()
    s._journal_file.close()
    s._journal_file = open("/dev/full", "ab")  # noqa: SIM115 (the store closes it)
    with pytest.raises(OSError, match=r"No space left on device: '.*journal.jsonl'"):
        s.commit([rec("a.jpg")])
    s.close()  # the bytes still buffered are not written again, and not raised about again
    assert json.loads(s.results.read_text()) == {}
