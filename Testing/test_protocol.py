"""The engine protocol is the contract: what the engine builds, a door reads back as it was, through JSON."""

from __future__ import annotations

import json

from LiverSegExtension import protocol


def through_json(message: dict) -> dict:
    return protocol.parse_message(json.dumps(message))


def test_every_message_reads_back_as_built():
    outcome = protocol.SegmentOutcome(1234.5, 0.8, "liverseg v1.1.0", ["a warning"], 0.17, "onnxruntime 1.19.2",
                                      "cpu", {"fine": 0.2}, "/tmp/draft.txt", None)
    message = through_json(outcome.message(7))
    assert protocol.event_of(message) == protocol.RESULT and protocol.id_of(message) == 7
    assert protocol.SegmentOutcome.read(message) == outcome
    trained = protocol.TrainOutcome("/m/liverseg-v1.2.0", False, "a Dice fell 0.030", [{"case": "x", "dice_new": 0.9}])
    assert protocol.TrainOutcome.read(through_json(trained.message(8))) == trained
    assert protocol.exported_case(through_json(protocol.export_result(9, "liverseg_20261207_abc"))) == "liverseg_20261207_abc"
    ready = protocol.Ready.read(through_json(protocol.ready(4321, {"onnxruntime": "1.19.2", "torch": None}, ["cpu"])))
    assert (ready.protocol, ready.pid, ready.devices) == (protocol.VERSION, 4321, ["cpu"])
    assert protocol.read_progress(through_json(protocol.progress(1, 0.12345, "fine"))) == (0.123, "fine")
    assert protocol.read_error(through_json(protocol.error(1, "x.nrrd: cannot be read", True))) == ("x.nrrd: cannot be read", "")
    assert protocol.note_text(through_json(protocol.note(1, "replaying 16 cases"))) == "replaying 16 cases"


def test_every_request_reads_back_as_a_door_builds_it():
    seg = protocol.parse_request(json.dumps(protocol.segment_request(1, "ct.nrrd", "mask.nrrd", "", "cpu", "CT", True)))
    read = protocol.SegmentRequest.read(seg)
    assert (read.input, read.output, read.device, read.source, read.attributes) == ("ct.nrrd", "mask.nrrd", "cpu", "CT", True)
    train = protocol.TrainRequest.read(protocol.parse_request(json.dumps(
        protocol.train_request(2, "parent", ["ds"], "out", "cpu", 200, "1.2.0"))))
    assert (train.init, train.data, train.iterations, train.version) == ("parent", ["ds"], 200, "1.2.0")
    export = protocol.ExportRequest.read(protocol.parse_request(json.dumps(
        protocol.export_request(3, "ds", {"image": "i.nrrd", "label": "l.nrrd"}, {"annotator": "A"}))))
    assert (export.image, export.label, export.draft, export.provenance) == ("i.nrrd", "l.nrrd", None, {"annotator": "A"})
