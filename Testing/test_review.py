"""Reviewing a batch's results, without Slicer: the worklist read from summary.csv (order, filter, each row's
own files), review.csv (claims that expire, resume after a restart, two annotators as two processes on one
folder), and ``liverseg review status`` on a half-reviewed folder."""

from __future__ import annotations

import csv
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import ROOT
from synthetic import make_affine, phantom, write_dicom_series

from LiverSegExtension import io
from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.geometry import image_from_array
from LiverSegExtension.review import ReviewState, ct_input, read_worklist
from LiverSegExtension.review.status import rank_correlation, review_summary

# (folder/name, status, uncertainty, warning): what a batch over a cohort of one-folder-per-patient gives
COHORT = [("a/ct", "ok", 0.02, ""), ("b/ct", "ok", 0.30, ""), ("c/ct", "warning", 0.05, "the mask is small"),
          ("d/ct", "ok", 0.11, ""), ("e/ct", "failed", None, ""), ("f/ct", "empty", 0.0, "no liver found")]


def make_batch(root: Path, cohort=COHORT) -> Path:
    """Patients' CTs in ``root/scans/<x>/ct.nii.gz`` and a batch output in ``root/out`` with masks mirroring
    them (``out/<x>/ct_liver.nii.gz``), its summary written by the batch's own writer, the paths as a run from
    ``root`` records them."""
    m = make_affine((6.0, 6.0, 8.0), (16, 24, 24))
    ct, liver = phantom((16, 24, 24), m)
    rows = []
    for name, status, uncertainty, warning in cohort:
        source = root / "scans" / f"{name}.nii.gz"
        source.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image_from_array(ct, m), str(source))
        output = root / "out" / f"{name}_liver.nii.gz"
        row = io.summary_row(f"scans/{name}.nii.gz", "" if status == "failed" else f"out/{name}_liver.nii.gz")
        if status != "failed":
            output.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image_from_array(liver * (status != "empty"), m), str(output))
        row.update(status=status, uncertainty="" if uncertainty is None else f"{uncertainty:.3f}", warning=warning,
                   liver_ml="" if status == "failed" else "100.0", error="unreadable" if status == "failed" else "")
        rows.append(row)
    io.write_summary(root / "out" / "summary.csv", rows)
    return root / "out"


class Clock:
    """A clock the test moves on."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 5, 4, 9, 0, tzinfo=dt.timezone.utc)

    def __call__(self) -> dt.datetime:
        return self.now


def test_worklist_puts_failed_and_warned_first_then_the_most_uncertain(tmp_path, monkeypatch):
    out = make_batch(tmp_path)
    monkeypatch.chdir(tmp_path.parent)  # another folder than the run's: the mask paths are found below out/
    cases = read_worklist(out)
    assert [c.name for c in cases] == ["e/ct", "c/ct", "f/ct", "b/ct", "d/ct", "a/ct"]
    assert cases[0].mask is None and cases[0].error == "unreadable"
    by_name = {c.name: c for c in cases}
    assert by_name["a/ct"].mask == out / "a" / "ct_liver.nii.gz"  # each row's own mask: two files called ct
    assert by_name["b/ct"].mask == out / "b" / "ct_liver.nii.gz"
    assert by_name["b/ct"].uncertainty == pytest.approx(0.30) and by_name["b/ct"].liver_ml == pytest.approx(100.0)
    # The CT from the row's input, relative to the folder the run stood in (out/'s parent here).
    assert ct_input(by_name["b/ct"], out).source == tmp_path / "scans" / "b" / "ct.nii.gz"


def test_columns_are_read_by_name_and_a_resolved_input_is_preferred(tmp_path):
    out = make_batch(tmp_path)
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    fields = list(dict.fromkeys(["extra", *reversed(list(rows[0])), "input_path"]))  # another order, more columns
    moved = tmp_path / "elsewhere"
    (tmp_path / "scans").rename(moved)  # the input as typed is gone; its resolved path is recorded
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "extra": "x", "input_path": str(moved / row["input"].split("/", 1)[1])})
    cases = {c.name: c for c in read_worklist(out)}
    assert cases["a/ct"].key == str(moved / "a" / "ct.nii.gz")  # the summary's own key for the row
    assert ct_input(cases["a/ct"], out).source == moved / "a" / "ct.nii.gz"
    (out / "summary.csv").write_text("name,size\nx,1\n")
    with pytest.raises(LiverSegError, match="not a LiverSeg summary"):
        read_worklist(out)
    with pytest.raises(LiverSegError, match="no summary.csv"):
        read_worklist(tmp_path / "scans-none")


def test_a_dicom_row_is_its_own_series_among_several(tmp_path):
    m = make_affine((6.0, 6.0, 8.0), (6, 16, 16))
    ct, _ = phantom((6, 16, 16), m)
    write_dicom_series(tmp_path / "study", ct, m, series_uid="1.2.3.1")
    for file in write_dicom_series(tmp_path / "other", ct + 5, m, series_uid="1.2.3.2"):
        file.rename(tmp_path / "study" / f"b{file.name}")  # two series in one folder
    cases = io.expand_inputs([tmp_path / "study"])
    out = tmp_path / "out"
    io.write_summary(out / "summary.csv", [io.summary_row(c.label, "") for c in cases])
    for case in read_worklist(out):
        found = ct_input(case, out)
        assert found.series_uid in case.key and len(found.files) == 6
        assert found.files == next(c.files for c in cases if c.series_uid == found.series_uid)


def test_claims_keep_cases_apart_expire_and_resume_after_a_restart(tmp_path):
    out = make_batch(tmp_path)
    keys = [c.key for c in read_worklist(out)]
    clock = Clock()
    ann, bob = ReviewState(out, claim_minutes=15, clock=clock), ReviewState(out, claim_minutes=15, clock=clock)
    assert ann.claim_next("ann", keys) == keys[0]
    assert bob.claim_next("bob", keys) == keys[1]  # never the case another holds
    with pytest.raises(LiverSegError, match="being reviewed by ann"):
        bob.claim(keys[0], "bob")
    # Slicer closed and opened again: a new state object, the same annotator, the same case.
    assert ReviewState(out, clock=clock).claim_next("ann", keys) == keys[0]
    ann.decide(keys[0], "ann", "accepted", dice_changed=1.0)
    assert ann.claim_next("ann", keys) == keys[2]
    clock.now += dt.timedelta(minutes=16)  # ann's Slicer crashed: her claim expires for the others
    assert bob.renew(keys[1], "bob") is True
    bob.decide(keys[1], "bob", "skipped", reason="wrong series")
    assert bob.claim_next("bob", keys) == keys[2]
    with pytest.raises(LiverSegError, match="needs a reason"):
        bob.decide(keys[2], "bob", "skipped", reason="  ")
    records = ann.records()
    assert records[keys[0]]["decision"] == "accepted" and records[keys[0]]["dice_changed"] == "1.0000"
    assert records[keys[1]]["reason"] == "wrong series" and records[keys[1]]["who"] == "bob"
    assert records[keys[2]]["claimed_by"] == "bob" and not records[keys[2]]["decision"]
    bob.release(keys[2], "bob")
    assert keys[2] not in ann.records()
    with open(out / "review.csv", newline="") as f:
        assert csv.DictReader(f).fieldnames[:6] == ["input", "name", "decision", "who", "when", "reason"]


def test_a_decision_needs_the_claim_and_an_earlier_one_is_kept(tmp_path):
    """A claim that ran out while its annotator was away is another's once taken: their decision is refused (and
    renew says so), a decided case keeps its decision, and only a re-review replaces it, keeping the earlier."""
    out = make_batch(tmp_path)
    keys = [c.key for c in read_worklist(out)]
    clock = Clock()
    ann, bob = ReviewState(out, claim_minutes=15, clock=clock), ReviewState(out, claim_minutes=15, clock=clock)
    assert ann.claim_next("ann", keys) == keys[0]
    clock.now += dt.timedelta(minutes=16)  # ann's Slicer was busy: her claim ran out, and bob takes the case
    assert bob.claim_next("bob", keys) == keys[0]
    with pytest.raises(LiverSegError, match="not recorded: bob holds this case now"):
        ann.decide(keys[0], "ann", "accepted", dice_changed=1.0)
    assert ann.renew(keys[0], "ann") is False
    bob.decide(keys[0], "bob", "skipped", reason="wrong phase")
    with pytest.raises(LiverSegError, match="not recorded: already skipped by bob"):
        ann.decide(keys[0], "ann", "accepted", dice_changed=1.0)
    with pytest.raises(LiverSegError, match="already skipped by bob.*re-review"):
        ann.claim(keys[0], "ann")  # opened from the table: a decided case is not taken unasked
    with pytest.raises(LiverSegError, match="you do not hold this case"):
        ann.decide(keys[1], "ann", "accepted", dice_changed=1.0)
    assert ann.records()[keys[0]]["decision"] == "skipped" and keys[1] not in ann.records()
    ann.claim(keys[0], "ann", again=True)  # a re-review
    ann.decide(keys[0], "ann", "accepted", dice_changed=1.0, again=True)
    row = ann.records()[keys[0]]
    assert (row["decision"], row["who"], row["reason"]) == ("accepted", "ann", "")
    assert row["previous"] == "skipped by bob at 2026-05-04T09:16:00+00:00" and not row["claimed_by"]


def unwritable(folder: Path) -> None:
    """Make ``folder`` refuse a new file, as a read-only share does (root writes anywhere: there, the lock's name is
    taken by a folder, which open() refuses the same way)."""
    import os

    if os.geteuid() == 0:
        (folder / ".review.csv.lock").mkdir()
    else:
        folder.chmod(0o555)


def test_an_unwritable_review_folder_is_one_line_naming_it(tmp_path):
    out = make_batch(tmp_path)
    keys = [c.key for c in read_worklist(out)]
    unwritable(out)
    try:
        with pytest.raises(LiverSegError, match=f"^{out}: cannot lock it for writing .*read-only"):
            ReviewState(out).claim_next("ann", keys)
        assert ReviewState(out).records() == {}  # reading takes no lock
    finally:
        out.chmod(0o755)


def test_a_review_file_being_read_elsewhere_is_replaced_once_the_reader_lets_go(tmp_path, monkeypatch):
    """Windows refuses to replace a file another process has open (another Slicer reading review.csv, for a
    moment): os.replace raises PermissionError, and the write is tried again."""
    import os

    out = make_batch(tmp_path)
    keys = [c.key for c in read_worklist(out)]
    real, refused = os.replace, []

    def replace(source, target):
        if Path(target).name == "review.csv" and len(refused) < 3:
            refused.append(target)
            raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                      "process", str(target))
        return real(source, target)

    monkeypatch.setattr(os, "replace", replace)
    assert ReviewState(out).claim_next("ann", keys) == keys[0]
    assert len(refused) == 3 and ReviewState(out).records()[keys[0]]["claimed_by"] == "ann"
    assert not list(out.glob(".review.csv*"))  # no temporary left behind


def test_the_ct_is_the_one_the_batch_record_names_not_one_in_the_current_folder(tmp_path, monkeypatch):
    """A relative input is looked for from the output folder and its parent before the current folder; where
    two places hold a file of that name, the batch's record beside the mask says which content it was made
    from, and without a record the case is refused rather than guessed."""
    from LiverSegExtension.io import InputCase
    from LiverSegExtension.io.records import identity, write_record
    from LiverSegExtension.review.worklist import record_of

    out = make_batch(tmp_path)
    m = make_affine((6.0, 6.0, 8.0), (16, 24, 24))
    decoy = tmp_path / "elsewhere" / "scans" / "b" / "ct.nii.gz"  # another patient's scan at the same relative place
    decoy.parent.mkdir(parents=True)
    sitk.WriteImage(image_from_array(phantom((16, 24, 24), m)[0] + 7, m), str(decoy))
    monkeypatch.chdir(tmp_path / "elsewhere")
    case = next(c for c in read_worklist(out) if c.name == "b/ct")
    right = tmp_path / "scans" / "b" / "ct.nii.gz"
    with pytest.raises(LiverSegError, match="the CT could be any of"):
        ct_input(case, out)
    write_record(record_of(case.mask), {"identity": identity(InputCase(right)), "state": "done",
                                        "outputs": [case.mask.name], "row": {}})
    assert ct_input(case, out).source == right
    write_record(record_of(case.mask), {"identity": {**identity(InputCase(right)), "fingerprint": "f" * 32,
                                                     "key": "/scans/someone-else.nii.gz"}, "state": "done"})
    with pytest.raises(LiverSegError, match="names another input .*someone-else"):
        ct_input(case, out)


def test_an_unreadable_review_file_is_named_and_never_overwritten(tmp_path):
    out = make_batch(tmp_path)
    (out / "review.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(LiverSegError, match="review.csv: unreadable"):
        ReviewState(out).claim_next("ann", [c.key for c in read_worklist(out)])
    assert (out / "review.csv").read_bytes() == b"\xff\xfe\x00garbage"


ANNOTATOR = r"""
import json, sys, time
from pathlib import Path
sys.path[:0] = [ROOT, TESTING]
import barrier
from LiverSegExtension.review import ReviewState, read_worklist
out, who, other, sync = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])


def wait_for(name):
    barrier.wait_for(sync, name)


keys = [c.key for c in read_worklist(out)]
state, log = ReviewState(out), []
(sync / f"ready-{who}").touch()
wait_for("go")  # both start together
while True:
    key = state.claim_next(who, keys)
    if key is None:
        break
    log.append(key)
    if len(log) <= 5:  # the first cases paced: each is decided only once the other holds a case of its own
        (sync / f"holds-{who}-{len(log)}").touch()
        wait_for(f"holds-{other}-{len(log)}")
    state.decide(key, who, "accepted", dice_changed=1.0)
print(json.dumps(log))
"""


@pytest.mark.process
def test_two_annotators_as_two_processes_share_no_case_and_lose_no_record(tmp_path):
    """Started together (a start barrier), each holding a case while the other does for their first five: the
    claims keep every case to one annotator, and the lock loses no record."""
    cohort = [(f"p{i:02d}/ct", "ok", i / 100, "") for i in range(40)]
    out = make_batch(tmp_path, cohort)
    script = tmp_path / "annotator.py"
    script.write_text(ANNOTATOR.replace("TESTING", repr(str(ROOT / "Testing"))).replace("ROOT", repr(str(ROOT))))
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = {who: subprocess.Popen([sys.executable, str(script), str(out), who, other, str(sync)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for who, other in (("ann", "bob"), ("bob", "ann"))}
    end = time.monotonic() + 600  # only against a hang
    while not all((sync / f"ready-{who}").exists() for who in procs) and time.monotonic() < end:
        assert all(p.poll() is None for p in procs.values())
        time.sleep(0.02)
    (sync / "go").touch()
    logs = {}
    for who, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)  # only against a hang
        assert proc.returncode == 0, stderr[-2000:]
        logs[who] = json.loads(stdout)
    assert not set(logs["ann"]) & set(logs["bob"])  # no case given to both
    assert len(logs["ann"]) >= 5 and len(logs["bob"]) >= 5
    records = ReviewState(out).records()
    assert len(records) == 40 and all(r["decision"] == "accepted" for r in records.values())  # no record lost
    assert {k for k, r in records.items() if r["who"] == "ann"} == set(logs["ann"])
    assert not list(out.glob(".review.csv*"))  # no lock or temporary left behind


def test_review_status_on_a_half_reviewed_folder(tmp_path, capsys):
    from LiverSegExtension.cli import main

    out = make_batch(tmp_path)
    cases = {c.name: c for c in read_worklist(out)}
    state = ReviewState(out)
    # The uncertainty ranks the changes: b (0.30) changed most, d (0.11) less, a (0.02) not at all.
    for name, who in (("b/ct", "ann"), ("d/ct", "bob"), ("a/ct", "ann"), ("e/ct", "ann"), ("c/ct", "bob")):
        state.claim(cases[name].key, who)
    state.decide(cases["b/ct"].key, "ann", "exported", dice_changed=0.70, dataset="ds", dataset_case="x1")
    state.decide(cases["d/ct"].key, "bob", "exported", dice_changed=0.97)
    state.decide(cases["a/ct"].key, "ann", "accepted", dice_changed=1.0)
    state.decide(cases["e/ct"].key, "ann", "skipped", reason="CT unreadable")
    numbers = review_summary(out)
    assert numbers["counts"] == {"accepted": 1, "exported": 2, "skipped": 1, "in review": 1, "not reviewed": 1}
    assert main(["review", "status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 of 6 case(s) reviewed (67 %)" in text
    assert "1 accepted, 2 exported, 1 skipped, 1 in review, 1 not reviewed" in text
    assert "unchanged     1 #" in text and "0.01-0.05     1 #" in text and ">= 0.20     1 #" in text
    assert text.index("b/ct: 1 - Dice 0.300") < text.index("d/ct: 1 - Dice 0.030")
    assert "Spearman rank correlation +1.00 over 3 case(s)" in text
    assert rank_correlation([0.3, 0.11, 0.02], [0.0, 0.03, 0.3]) == pytest.approx(-1.0)
    assert rank_correlation([0.3, 0.11], [0.3, 0.03]) is None  # too few to rank

