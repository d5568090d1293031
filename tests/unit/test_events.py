"""medjax.training.events against hand-encoded bytes and against an independent protobuf
implementation: tensorboardX's compiled `Event` proto (google.protobuf) reads what medjax
writes, and medjax reads what tensorboardX writes."""

import math
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2, summary_pb2

from medjax.training import events, metrics


def test_a_scalar_event_by_hand():
    # Event{wall_time: 2.0, step: 3, summary{value{tag: "a", simple_value: 1.5}}}
    value = b"\x0a\x01a" + b"\x15" + struct.pack("<f", 1.5)  # tag = 1, simple_value = 2
    summary = b"\x0a" + bytes([len(value)]) + value  # Summary.value = 1
    expected = b"\x09" + struct.pack("<d", 2.0) + b"\x10\x03" + b"\x2a" + bytes([len(summary)])
    expected += summary
    event = events.Event(2.0, 3, scalars=(("a", 1.5),))
    assert events.encode(event) == expected
    assert events.decode(expected) == event


def test_protobuf_reads_what_medjax_writes():
    event = events.Event(
        1_796_400_000.25, 300, scalars=(("loss", 0.1), ("zero", 0.0), ("big", 1e40), ("n", -2.5))
    )
    proto = event_pb2.Event.FromString(events.encode(event))
    assert proto.wall_time == 1_796_400_000.25 and proto.step == 300
    values = [(v.tag, v.WhichOneof("value"), v.simple_value) for v in proto.summary.value]
    assert values == [
        ("loss", "simple_value", float(np.float32(0.1))),
        ("zero", "simple_value", 0.0),  # A oneof member: set, though 0.
        ("big", "simple_value", math.inf),
        ("n", "simple_value", -2.5),
    ]
    start = event_pb2.Event.FromString(
        events.encode(events.Event(5.0, -4, session_status=events.SESSION_START))
    )
    assert start.step == -4 and start.session_log.status == event_pb2.SessionLog.START
    header = event_pb2.Event.FromString(events.encode(events.Event(5.0, file_version="v")))
    assert header.file_version == "v" and not header.HasField("summary")


def test_medjax_reads_what_protobuf_writes_and_skips_other_fields():
    proto = event_pb2.Event(wall_time=7.5, step=2**40)
    proto.summary.value.add(tag="a", simple_value=0.25)
    image = proto.summary.value.add(tag="img")
    image.image.height = 3  # Not a scalar: skipped.
    proto.summary.value.add(tag="b", simple_value=-1.0)
    assert events.decode(proto.SerializeToString()) == events.Event(
        7.5, 2**40, None, (("a", 0.25), ("b", -1.0)), None
    )
    header = event_pb2.Event(wall_time=1.0, file_version="brain.Event:2")
    assert events.decode(header.SerializeToString()) == events.Event(1.0, 0, "brain.Event:2")
    log = event_pb2.Event(step=9)
    log.log_message.message = "skipped"  # Another member of Event's oneof: skipped.
    assert events.decode(log.SerializeToString()) == events.Event(step=9)
    negative = event_pb2.Event(step=-3, session_log=event_pb2.SessionLog(status=1))
    assert events.decode(negative.SerializeToString()) == events.Event(step=-3, session_status=1)
    assert events.decode(b"") == events.Event()


def test_the_writers_files_read_through_protobuf(tmp_path):
    with metrics.MetricsWriter(tmp_path, interactive=False) as writer:
        writer.start(4)
        writer.write(5, {"loss": 0.5, "eval/acc": 1})
    (path,) = [p for p in tmp_path.iterdir() if p.name.startswith("events.out.tfevents.")]
    data, protos = path.read_bytes(), []
    while data:  # TFRecords: length, its masked CRC, the payload, its masked CRC.
        (length,) = struct.unpack("<Q", data[:8])
        protos.append(event_pb2.Event.FromString(data[12 : 12 + length]))
        data = data[16 + length :]
    assert protos[0].file_version == "brain.Event:2"
    assert (protos[1].step, protos[1].session_log.status) == (5, event_pb2.SessionLog.START)
    assert protos[2].step == 5
    assert {v.tag: v.simple_value for v in protos[2].summary.value} == {"loss": 0.5, "eval/acc": 1}
    assert isinstance(protos[2].summary, summary_pb2.Summary)


def test_an_event_holds_one_of_its_oneof_members():
    with pytest.raises(ValueError, match="one of"):
        events.encode(events.Event(1.0, file_version="v", scalars=(("a", 1.0),)))


@pytest.mark.parametrize(
    "data", [b"\x0a\x05ab", b"\x09\x00\x00", b"\x80", b"\x0b\x00", b"\x00\x01"], ids=str
)
def test_malformed_bytes_raise(data):
    with pytest.raises(ValueError):
        events.decode(data)
