"""Metrics: scalars to TensorBoard event files and to `metrics.jsonl`, with progress on stderr.

`MetricsWriter` writes each step's scalars twice under `run_dir/subdir`: to TensorBoard event
files (TFRecords of `Event` protos, encoded in `events`; no TensorFlow), and as one JSON object
per line to `metrics.jsonl`, which `read_jsonl` reads back. It also shows progress: a tqdm bar
on a terminal, else one plain log line every `log_every` steps. Only the writing process
(process 0 in multi-host runs) writes or shows anything.

Steps count completed updates: the record for step s describes the s-th update, so a run resumed
from a checkpoint taken at step s calls `truncate_after(s)` and `start(s)`, then writes steps
> s. `start` also marks the new event file so that TensorBoard hides the earlier run's events at
steps > s, as `truncate_after` drops them from the JSONL.

`read_event_scalars` reads the event files back without TensorFlow (the TFRecord framing with
both CRCs checked, and the `Event` proto), applying those marks as TensorBoard does.

`run_dir` may be remote (`gs://...`, through `etils.epath`). Such filesystems cannot append to
an object (gcsfs silently overwrites it instead), so there each write rewrites the whole JSONL
and event file from a copy kept in memory: the files are a few kilobytes per thousand steps.
"""

import io
import json
import math
import operator
import os
import pathlib
import re
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tqdm
from etils import epath

from medjax import paths
from medjax.training import events as events_lib

JSONL_NAME = "metrics.jsonl"
EVENT_FILE_MARKER = "events.out.tfevents."
# JSON has no NaN or infinity; these strings stand for them in metrics.jsonl (still valid JSON).
NONFINITE_STRINGS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# TensorBoard's writers rewrite other characters to "_" (tensorboardX's `_clean_tag`); keys
# are kept to these so that any tool reads the same names in both outputs.
_TAG_RE = re.compile(r"[-\w.][-/\w.]*")
_RESERVED_KEYS = ("step", "time")


class MetricsWriter:
    """Writes scalars to TensorBoard event files and to `metrics.jsonl`, and shows progress.

    Files go to `run_dir/subdir`: event files named `events.out.tfevents.*` (one per writer,
    made on `start` or the first `write`) and `metrics.jsonl`, appended to. Every `write` is
    flushed to both at once, so a crash loses nothing already written.

    Progress goes to stderr. Interactive: a tqdm bar (position, rate, ETA) whose postfix shows
    a few key scalars. Otherwise a plain line on the first write, then on the first write at or
    past each multiple of `log_every`, and at `total_steps`, e.g.
    `train step 12/100 loss=0.1234 reward_mean=0.5 (3.2 s/step, ETA 4m40s)`, where the rate
    is measured since the previous line (or since `start`) and leaves out the time this
    process spent compiling (`compile_seconds`), which the line shows apart
    (`3.2 s/step + 41 s compiling`): a first step that compiles does not inflate the ETA. The
    bar's ETA (interactive) leaves compilation out the same way.

    Also a context manager that closes itself.

    Attributes:
      logdir: `run_dir/subdir`, where the files go.
      jsonl_path: `logdir/metrics.jsonl`.
      is_writer: whether this process writes and shows anything.
      interactive: whether progress is a tqdm bar (else plain log lines).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        total_steps: int | None = None,
        is_writer: bool = True,
        interactive: bool | None = None,
        log_every: int = 1,
        desc: str = "train",
        subdir: str = "",
        progress_keys: Sequence[str] = ("loss", "reward_mean"),
    ):
        """Makes nothing on disk yet.

        Args:
          run_dir: the run's directory.
          total_steps: the step the run ends at, for the bar and the ETA; None if unknown.
          is_writer: False on every process but the one that writes (non-zero processes of a
            multi-host run): then nothing is written or shown.
          interactive: a tqdm bar if True, plain log lines if False; None: True iff stderr is
            a terminal.
          log_every: plain log lines every this many steps (not interactive).
          desc: the label of the bar and of the log lines.
          subdir: a subdirectory of `run_dir` for these files ("" for `run_dir` itself), e.g.
            "eval", which TensorBoard shows as its own run.
          progress_keys: the scalars the bar and the log lines show, those present, in this
            order; when none is present, the first three keys in sorted order.
        """
        if log_every < 1:
            raise ValueError(f"MetricsWriter: log_every must be >= 1, got {log_every}.")
        # Local paths keep pathlib (open, append, rename); remote ones go through epath.
        self._remote = paths.is_remote(run_dir)
        path_type = epath.Path if self._remote else pathlib.Path
        self.logdir = path_type(run_dir) / subdir if subdir else path_type(run_dir)
        self.jsonl_path = self.logdir / JSONL_NAME
        self.is_writer = is_writer
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._total_steps = total_steps
        self._log_every = log_every
        self._desc = desc
        self._progress_keys = tuple(progress_keys)
        self._events: io.BufferedWriter | _RewrittenFile | None = None
        self._jsonl: io.TextIOWrapper | _RewrittenFile | None = None
        self._bar: tqdm.tqdm | None = None
        self._start_step: int | None = None
        # (step, monotonic time, compile_seconds()) of the last line or of `start`.
        self._last_line: tuple[int, float, float] | None = None
        self._logged = False
        self._closed = False

    def start(self, step: int) -> None:
        """Marks the step the run starts (0) or resumes (the checkpoint's step) at.

        Opens the event file with a TensorBoard purge mark at `step + 1`: TensorBoard then
        hides events an earlier run wrote for steps > `step` (they are still in its files).
        Sets the bar's initial position and the log lines' rate baseline. Call at most once,
        before the first `write`.
        """
        self._check_open()
        step = operator.index(step)
        if self._start_step is not None or self._events is not None:
            raise ValueError("MetricsWriter.start: call once, before the first write.")
        self._start_step = step
        if not self.is_writer:
            return
        self._open_events(purge_step=step + 1)
        self._last_line = (step, time.monotonic(), compile_seconds())
        if self.interactive:
            self._open_bar(step)

    def write(self, step: int, scalars: Mapping[str, float | int | np.number | jax.Array]) -> None:
        """Writes one step's scalars to both outputs and updates the progress display.

        Args:
          step: the step (an int, or an integer scalar array).
          scalars: name -> a number or a one-element array (moved to the host). Names are
            TensorBoard tags: letters, digits, "_", "-", ".", "/" (not first); "step" and
            "time" are reserved.

        Each value becomes a Python float. TensorBoard stores it as float32; the JSONL line is
        `{"step": step, "time": unix_time, **scalars}` with the scalar keys sorted after
        "step" and "time", float64 values written exactly, and NaN, inf, -inf as the strings
        "nan", "inf", "-inf" (`read_jsonl` turns them back).
        """
        self._check_open()
        step = operator.index(step)
        _check_keys(scalars)
        if not self.is_writer:
            return  # Before reading the values: no host sync on processes that write nothing.
        values = _to_floats(scalars)
        now = time.time()
        if self._events is None:
            self._open_events(purge_step=None)
        self._write_event(events_lib.Event(now, step, scalars=tuple(values.items())))
        record = {"step": step, "time": now}
        record.update({k: _json_float(v) for k, v in values.items()})
        if self._jsonl is None:
            self.logdir.mkdir(parents=True, exist_ok=True)
            if self._remote:
                old = self.jsonl_path.read_bytes() if self.jsonl_path.exists() else b""
                self._jsonl = _RewrittenFile(self.jsonl_path, old)
            else:
                self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        self._show(step, values)

    def truncate_after(self, step: int) -> int:
        """Drops the JSONL records of steps > `step`, for a run resuming at `step`.

        Call before writing new records. The file is rewritten through a temporary file and
        `os.replace` (a remote file: in one write, which object stores make atomic), so a
        crash leaves either the old or the new file. A last line that does
        not parse (a crash while writing it) is dropped too; any other bad line raises
        ValueError naming the file and line.

        Returns:
          how many lines were dropped (0 if the file does not exist, or on a non-writer).
        """
        self._check_open()
        step = operator.index(step)
        if not self.is_writer or not self.jsonl_path.exists():
            return 0
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        text = self.jsonl_path.read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        kept = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record_step = int(record["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                if number == len(lines) and not line.endswith("\n"):
                    continue
                raise ValueError(
                    f"MetricsWriter.truncate_after: {self.jsonl_path}:{number}: {e}"
                ) from e
            if record_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        dropped = sum(1 for line in lines if line.strip()) - len(kept)
        # Also rewrites when only a final newline is missing, so the next line starts afresh.
        if "".join(kept) != text and self._remote:
            self.jsonl_path.write_text("".join(kept), encoding="utf-8")
        elif "".join(kept) != text:
            fd, tmp = tempfile.mkstemp(dir=self.logdir, prefix=".metrics.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.writelines(kept)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.jsonl_path)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
        return dropped

    def close(self) -> None:
        """Flushes and closes the event file, the JSONL file and the bar. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._events is not None:
            self._events.close()
        if self._jsonl is not None:
            self._jsonl.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("MetricsWriter: already closed.")

    def _open_events(self, purge_step: int | None) -> None:
        # TensorBoard's name: the second and the host, then nanoseconds, which keep two
        # writers of one second apart and in creation order (the order TensorBoard reads).
        now = time.time()
        name = f"{EVENT_FILE_MARKER}{int(now)}.{socket.gethostname()}.{time.time_ns()}"
        self.logdir.mkdir(parents=True, exist_ok=True)
        if self._remote:
            self._events = _RewrittenFile(self.logdir / name, b"")
        else:
            self._events = open(self.logdir / name, "xb")  # noqa: SIM115 - closed by close().
        self._write_event(events_lib.Event(now, file_version=events_lib.FILE_VERSION))
        if purge_step is not None:
            start = events_lib.Event(now, purge_step, session_status=events_lib.SESSION_START)
            self._write_event(start)

    def _write_event(self, event: events_lib.Event) -> None:
        payload = events_lib.encode(event)
        header = struct.pack("<Q", len(payload))
        record = header + struct.pack("<I", masked_crc32c(header))
        record += payload + struct.pack("<I", masked_crc32c(payload))
        self._events.write(record)
        self._events.flush()

    def _open_bar(self, initial: int) -> None:
        # tqdm's own remaining time would count compilation: the postfix carries ours.
        self._bar = tqdm.tqdm(
            total=self._total_steps,
            initial=initial,
            desc=self._desc,
            file=sys.stderr,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        )

    def _shown(self, values: Mapping[str, float]) -> dict[str, str]:
        keys = [k for k in self._progress_keys if k in values] or sorted(values)[:3]
        return {k: f"{values[k]:.4g}" for k in keys}

    def _timing(self, step: int, now: float, compiled: float) -> str | None:
        """'3.2 s/step[ + 41 s compiling][, ETA 4m40s]' since the last line, or None."""
        last = self._last_line
        if last is None or step <= last[0]:
            return None
        compiling = compiled - last[2]
        per_step = max(now - last[1] - compiling, 0.0) / (step - last[0])
        timing = f"{per_step:.3g} s/step"
        if compiling >= 0.5:
            timing += f" + {compiling:.0f} s compiling"
        if self._total_steps is not None:
            timing += f", ETA {_format_duration(per_step * max(self._total_steps - step, 0))}"
        return timing

    def _show(self, step: int, values: Mapping[str, float]) -> None:
        if self.interactive:
            if self._bar is None:
                self._open_bar(step if self._start_step is None else self._start_step)
            shown = self._shown(values)
            now, compiled = time.monotonic(), compile_seconds()
            if (timing := self._timing(step, now, compiled)) is not None:
                shown["time"] = timing
            if timing is not None or self._last_line is None:
                self._last_line = (step, now, compiled)
            self._bar.set_postfix(shown, refresh=False)
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            else:
                self._bar.refresh()
            return
        now, compiled = time.monotonic(), compile_seconds()
        last = self._last_line
        due = (
            not self._logged
            or step // self._log_every > last[0] // self._log_every
            or (self._total_steps is not None and step >= self._total_steps)
        )
        if not due:
            return
        total = "" if self._total_steps is None else f"/{self._total_steps}"
        parts = [f"{self._desc} step {step}{total}"]
        parts += [f"{k}={v}" for k, v in self._shown(values).items()]
        if (timing := self._timing(step, now, compiled)) is not None:
            parts.append(f"({timing})")
        sys.stderr.write(" ".join(parts) + "\n")
        sys.stderr.flush()
        self._last_line = (step, now, compiled)
        self._logged = True


class _RewrittenFile:
    """A file on a filesystem without append: `flush` rewrites the whole object with
    everything written so far (kept in memory), so no earlier record is lost."""

    def __init__(self, path: epath.Path, data: bytes):
        self.path = path
        self._data = bytearray(data)

    def write(self, data: bytes | str) -> None:
        self._data += data.encode("utf-8") if isinstance(data, str) else data

    def flush(self) -> None:
        self.path.write_bytes(bytes(self._data))

    def close(self) -> None:
        pass  # Every write was flushed.


# Seconds this process has spent tracing, lowering and compiling jitted programs: the sum of
# JAX's "/jax/core/compile/..." duration events, counted from the first `compile_seconds` call.
_compile_seconds = 0.0
_listening = False


def _count_compile(event: str, duration: float, **kwargs) -> None:
    global _compile_seconds
    del kwargs
    if event.startswith("/jax/core/compile/"):
        _compile_seconds += duration


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling with JAX since it first
    asked (the first call starts the count and returns 0)."""
    global _listening
    if not _listening:
        jax.monitoring.register_event_duration_secs_listener(_count_compile)
        _listening = True
    return _compile_seconds


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads `metrics.jsonl` back, one dict per line, in file order.

    The strings "nan", "inf" and "-inf" become floats again. A bad line raises ValueError
    naming the file and line number.
    """
    out = []
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"read_jsonl: {os.fspath(path)}:{number}: {e}") from e
            if not isinstance(record, dict):
                raise ValueError(f"read_jsonl: {os.fspath(path)}:{number}: not an object.")
            out.append(
                {
                    k: NONFINITE_STRINGS[v] if isinstance(v, str) and v in NONFINITE_STRINGS else v
                    for k, v in record.items()
                }
            )
    return out


def read_event_scalars(logdir: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """Reads the scalars of the event files in `logdir` (not its subdirectories).

    Files are read in name order (TensorBoard's; `MetricsWriter` names sort in creation
    order). Each TFRecord's length and data CRCs are checked. A purge mark (a SessionLog START
    at step p, written by `MetricsWriter.start`) drops the scalars read so far at steps >= p,
    as TensorBoard does, so the result is what TensorBoard shows.

    Returns:
      tag -> [(step, value)] of `simple_value` scalars (float32 values as Python floats), in
      file order; other summaries are skipped.

    Raises:
      ValueError: a corrupt or truncated record, naming the file and the byte offset.
    """
    path_type = epath.Path if paths.is_remote(logdir) else pathlib.Path
    files = sorted(p for p in path_type(logdir).iterdir() if EVENT_FILE_MARKER in p.name)
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in files:
        for event in _read_events(path):
            if event.session_status == events_lib.SESSION_START:
                for tag, points in scalars.items():
                    scalars[tag] = [(s, v) for s, v in points if s < event.step]
            for tag, value in event.scalars:
                scalars.setdefault(tag, []).append((event.step, value))
    return {tag: points for tag, points in scalars.items() if points}


def _open_text(path: str | os.PathLike[str]):
    if paths.is_remote(path):
        return epath.Path(path).open("r", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_events(path: pathlib.Path) -> list[events_lib.Event]:
    """Decodes one event file: records of uint64 length, masked CRC32C of the length, the data
    and the masked CRC32C of the data (little-endian)."""
    data = path.read_bytes()
    events, offset = [], 0
    while offset < len(data):
        if len(data) - offset < 12:
            raise _corrupt(path, offset, "truncated header")
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        if masked_crc32c(header) != length_crc:
            raise _corrupt(path, offset, "length CRC mismatch")
        end = offset + 12 + length + 4
        if end > len(data):
            raise _corrupt(path, offset, "truncated data")
        payload = data[offset + 12 : end - 4]
        (payload_crc,) = struct.unpack("<I", data[end - 4 : end])
        if masked_crc32c(payload) != payload_crc:
            raise _corrupt(path, offset, "data CRC mismatch")
        try:
            events.append(events_lib.decode(payload))
        except ValueError as e:
            raise _corrupt(path, offset, f"bad Event proto ({e})") from e
        offset = end
    return events


def _corrupt(path: pathlib.Path, offset: int, reason: str) -> ValueError:
    return ValueError(f"read_event_scalars: {path}: corrupt record at offset {offset}: {reason}.")


def _make_crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # reflected Castagnoli
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def _crc32c_python(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


try:  # A native CRC32C when one is installed; the pure-Python one reads ~1 MB/s.
    import google_crc32c

    def crc32c(data: bytes) -> int:
        """CRC-32C (Castagnoli) of `data`, as TFRecord files use it."""
        return google_crc32c.value(data)

except ImportError:
    try:
        import crc32c as _crc32c_lib

        def crc32c(data: bytes) -> int:
            """CRC-32C (Castagnoli) of `data`, as TFRecord files use it."""
            return _crc32c_lib.crc32c(data)

    except ImportError:
        crc32c = _crc32c_python


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C: the CRC rotated right by 15 bits plus 0xA282EAD8 (mod 2^32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _check_keys(scalars: Mapping[str, Any]) -> None:
    for key in scalars:
        if not isinstance(key, str) or not _TAG_RE.fullmatch(key) or key in _RESERVED_KEYS:
            raise ValueError(
                f"MetricsWriter.write: bad key {key!r} (letters, digits, '_', '-', '.', and "
                f"'/' not first; not {' or '.join(_RESERVED_KEYS)})."
            )


def _to_floats(scalars: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key in sorted(scalars):
        array = np.asarray(scalars[key])
        # jax.dtypes knows bfloat16 and the other ml_dtypes floats; numpy does not.
        real = jax.dtypes.issubdtype(array.dtype, np.floating) or array.dtype.kind in "biu"
        if array.size != 1 or not real:
            raise ValueError(
                f"MetricsWriter.write: {key!r} must be one real number, got dtype "
                f"{array.dtype} and shape {array.shape}."
            )
        out[key] = float(array.reshape(()))
    return out


def _json_float(value: float) -> float | str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
