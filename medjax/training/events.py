"""TensorBoard event records, encoded and decoded here: the few `Event` fields scalars need.

An event file is a sequence of TFRecords (see `metrics`) whose payloads are `tensorflow.Event`
protocol buffers. Writing scalars needs five of its fields, and reading them back the same
five, so this module speaks the protobuf wire format for exactly those (field numbers from
TensorBoard's `event.proto` and `summary.proto`):

    Event:      wall_time = 1 (double), step = 2 (int64), file_version = 3 (string),
                summary = 5 (Summary), session_log = 7 (SessionLog)
    Summary:    value = 1 (repeated Value)
    Value:      tag = 1 (string), simple_value = 2 (float)
    SessionLog: status = 1 (enum; START = 1)

file_version, summary and session_log are members of one oneof: an event holds one of them.
Decoding skips every other field (histograms, graphs, tensors written by other tools), so any
event file reads. Writing through tensorboardX instead would import PyTorch wherever it is
installed (tensorboardX's writer does at import): seconds at the start of every run.
"""

import dataclasses
import struct

import numpy as np

SESSION_START = 1
FILE_VERSION = "brain.Event:2"

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


@dataclasses.dataclass(frozen=True)
class Event:
    """The fields of one event that scalars use.

    Attributes:
      wall_time: seconds since the epoch.
      step: the global step.
      file_version: set on a file's first event only ("brain.Event:2").
      scalars: (tag, value) of the summary's `simple_value` entries, in order.
      session_status: the SessionLog status (SESSION_START marks a purge), or None.
    """

    wall_time: float = 0.0
    step: int = 0
    file_version: str | None = None
    scalars: tuple[tuple[str, float], ...] = ()
    session_status: int | None = None


def encode(event: Event) -> bytes:
    """The Event proto's bytes (fields in number order, as protobuf writes them).

    Raises:
      ValueError: more than one of file_version, scalars and session_status is set (they
        are members of one oneof in `event.proto`: a reader would keep only the last).
    """
    members = (
        event.file_version is not None,
        bool(event.scalars),
        event.session_status is not None,
    )
    if sum(members) > 1:
        raise ValueError("events.encode: set one of file_version, scalars, session_status.")
    out = bytearray()
    if event.wall_time:
        out += _key(1, _FIXED64) + struct.pack("<d", event.wall_time)
    if event.step:
        out += _key(2, _VARINT) + _varint(event.step & 0xFFFF_FFFF_FFFF_FFFF)
    if event.file_version is not None:
        out += _bytes_field(3, event.file_version.encode("utf-8"))
    if event.scalars:
        summary = bytearray()
        for tag, value in event.scalars:
            # simple_value is in a oneof: written even when 0, so that it reads back as set.
            item = _bytes_field(1, tag.encode("utf-8")) + _key(2, _FIXED32)
            # float32, as TensorBoard stores it (beyond its range: infinity, as numpy rounds).
            with np.errstate(over="ignore"):
                item += np.asarray(value, "<f4").tobytes()
            summary += _bytes_field(1, item)
        out += _bytes_field(5, bytes(summary))
    if event.session_status is not None:
        status = _key(1, _VARINT) + _varint(event.session_status) if event.session_status else b""
        out += _bytes_field(7, status)
    return bytes(out)


def decode(data: bytes) -> Event:
    """Reads an Event proto's bytes; fields other than the five above are skipped.

    Raises:
      ValueError: the bytes are not a well-formed message.
    """
    wall_time, step, file_version, scalars, status = 0.0, 0, None, [], None
    for number, wire, value in _fields(data):
        if number == 1 and wire == _FIXED64:
            (wall_time,) = struct.unpack("<d", value)
        elif number == 2 and wire == _VARINT:
            step = value - (1 << 64) if value >= 1 << 63 else value
        elif number == 3 and wire == _BYTES:
            file_version = _text(value)
        elif number == 5 and wire == _BYTES:
            scalars += _summary_scalars(value)
        elif number == 7 and wire == _BYTES:
            status = 0
            for n, w, v in _fields(value):
                if n == 1 and w == _VARINT:
                    status = v
    return Event(wall_time, step, file_version, tuple(scalars), status)


def _summary_scalars(data: bytes) -> list[tuple[str, float]]:
    out = []
    for number, wire, item in _fields(data):
        if number != 1 or wire != _BYTES:
            continue
        tag, value = "", None
        for n, w, v in _fields(item):
            if n == 1 and w == _BYTES:
                tag = _text(v)
            elif n == 2 and w == _FIXED32:
                (value,) = struct.unpack("<f", v)
        if value is not None:
            out.append((tag, value))
    return out


def _fields(data: bytes):
    """Yields (field number, wire type, value) of a message: an int for varints, bytes
    otherwise."""
    offset = 0
    while offset < len(data):
        key, offset = _read_varint(data, offset)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, offset = _read_varint(data, offset)
        elif wire in (_FIXED64, _FIXED32):
            size = 8 if wire == _FIXED64 else 4
            value, offset = data[offset : offset + size], offset + size
            if len(value) != size:
                raise ValueError("truncated fixed-width field")
        elif wire == _BYTES:
            size, offset = _read_varint(data, offset)
            value, offset = data[offset : offset + size], offset + size
            if len(value) != size:
                raise ValueError("truncated length-delimited field")
        else:
            raise ValueError(f"unsupported wire type {wire} (field {number})")
        if number == 0:
            raise ValueError("field number 0")
        yield number, wire, value


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, offset


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _key(number, _BYTES) + _varint(len(payload)) + payload


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")
