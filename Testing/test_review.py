"""Reviewing a batch's results, without Slicer: the worklist read from summary.csv (order, filter, each row's
own files), review.csv (claims that expire, resume after a restart, two annotators as two processes on one
folder), and ``liverseg review status`` on a half-reviewed folder."""

from __future__ import annotations

import csv
import datetime as dt
import json
import subprocess
import sys
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


def test_an_unreadable_review_file_is_named_and_never_overwritten(tmp_path):
    out = make_batch(tmp_path)
    (out / "review.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(LiverSegError, match="review.csv: unreadable"):
        ReviewState(out).claim_next("ann", [c.key for c in read_worklist(out)])
    assert (out / "review.csv").read_bytes() == b"\xff\xfe\x00garbage"


ANNOTATOR = r"""
import json, random, sys, time
sys.path.insert(0, ROOT)
from LiverSegExtension.review import ReviewState, read_worklist
out, who = sys.argv[1], sys.argv[2]
keys = [c.key for c in read_worklist(out)]
state, log = ReviewState(out), []
random.seed(who)
while True:
    key = state.claim_next(who, keys)
    if key is None:
        break
    log.append(key)
    time.sleep(random.random() * 0.01)  # looking at the case
    state.decide(key, who, "accepted", dice_changed=1.0)
print(json.dumps(log))
"""


def test_two_annotators_as_two_processes_share_no_case_and_lose_no_record(tmp_path):
    cohort = [(f"p{i:02d}/ct", "ok", i / 100, "") for i in range(40)]
    out = make_batch(tmp_path, cohort)
    script = tmp_path / "annotator.py"
    script.write_text(ANNOTATOR.replace("ROOT", repr(str(ROOT))))
    procs = [subprocess.Popen([sys.executable, str(script), str(out), who], stdout=subprocess.PIPE, text=True)
             for who in ("ann", "bob")]
    logs = {}
    for who, proc in zip(("ann", "bob"), procs):
        stdout, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        logs[who] = json.loads(stdout)
    assert not set(logs["ann"]) & set(logs["bob"])  # no case given to both
    assert logs["ann"] and logs["bob"]
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
    state.decide(cases["b/ct"].key, "ann", "exported", dice_changed=0.70, dataset="ds", dataset_case="x1")
    state.decide(cases["d/ct"].key, "bob", "exported", dice_changed=0.97)
    state.decide(cases["a/ct"].key, "ann", "accepted", dice_changed=1.0)
    state.decide(cases["e/ct"].key, "ann", "skipped", reason="CT unreadable")
    state.claim(cases["c/ct"].key, "bob")
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

