"""The per-exit trace: one JSON line per VMExit, packed on the vCPU thread and formatted by a writer process (fields in README)."""

from __future__ import annotations

import json
import marshal
import os
import select
import struct
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from io import BytesIO
from pathlib import Path
from typing import IO, Any

from .affinity import release_process
from .exit_reasons import NAMES
from .exit_reasons import name as reason_name

TRACE_VERSION = 1
FLUSH_EVERY = 4096

# A record as the vCPU hands it over (a tuple: no dict per exit on the hot path):
# (seq, t_ns, vcpu, reason_code, qualification, rip, insn_json, handled_by, latency_ns, io, extra)
# io = (port, size, direction, string, rep, count, data) or None; extra = dict or None.
Record = tuple[int, int, int, int, int, int, str, str, int, tuple | None, dict | None]

_BOOL = {True: "true", False: "false"}

# The offloaded writer. The vCPU thread only appends each record to a list; every BATCH records
# the list is serialized in one C call (marshal) into a message, and every CHUNK bytes of
# messages go to the writer process (`python -m hvm.trace_sink`) in one os.write. Formatting,
# the expensive part, happens in that process on the other core. A batch is kept small so the
# records are still in the CPU cache when they are packed (measured: 4096-record batches cost
# the vCPU thread ~0.2 us more per record than 256-record ones).
BATCH = 256
CHUNK = 64 * 1024
PIPE_SIZE = 1 << 20  # room for ~13k records, so the vCPU does not wait on a writer that lags briefly
MAX_BACKLOG = 32 << 20  # packed bytes (~400k records) kept here before the vCPU waits for the writer
SEND_TIMEOUT_S = 30.0  # a writer process that reads nothing for this long is stuck
READY_TIMEOUT_S = 30.0  # bound for the writer process to start, once the backlog is full
CLOSE_TIMEOUT_S = 120.0  # bound for the writer to drain what it was sent and exit

# Wire format, TraceWriter -> hvm.trace_sink: messages, each a head (kind, payload length as
# u32 little-endian) then the payload. Both ends are the same interpreter (sys.executable),
# so marshal's format is shared.
MSG_HEAD = struct.Struct("<cI")
MSG_RECORDS = b"R"  # marshal (version 2) of a list of Records
MSG_TEXT = b"T"  # lines already formatted (UTF-8, surrogatepass)
MSG_END = b"E"  # the last message: the process closes the file and exits 0
_MARSHAL_VERSION = 2  # see the compact records below
# The package root, put on the writer process's path so it imports this very hvm package.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
# The writer process; the trace file's descriptor number is appended. -P -S: it needs only the
# standard library and this package (found through PYTHONPATH), not the current directory.
WRITER_COMMAND: tuple[str, ...] = (sys.executable, "-P", "-S", "-m", "hvm.trace_sink")


class TraceWriteError(RuntimeError):
    """The trace file could not be written completely (the writer process died or hung)."""


# Compact records for the most frequent exits. What is the same each time one instruction
# exits and the hypervisor serves it ("a site": vcpu, the vCPU's time origin t0_ns, reason, the
# qualification without the port, rip, insn, handled_by, size, direction, string, rep, count)
# is sent once as a site definition (SITE_TAG, site_id, *static); each exit then is (site_id,
# port, seq + 1, t_exit, t_entry, data): the clock readings raw, as CLOCK_MONOTONIC seconds in
# a float (time.perf_counter), rounded to ns and subtracted here, not on the vCPU thread. A
# double holds those ns exactly while the host has been up less than 2^52 ns (52 days); after
# that a time may be 1 ns off. The lines they format to are exactly those of the full record.
# A batch of records travels as marshal version 2: with only numbers and no shared strings in
# them, it skips version 4's reference table.
SITE_TAG = "S"
Sites = dict[int, tuple[str, int, int]]  # site id -> (line template, t0_ns, qualification base)


def site_entry(static: tuple) -> tuple[str, int, int]:
    """A site definition's static part as the formatter keeps it: the line with the static
    values in place and %-slots for seq, t_ns, qualification, latency, port, data."""
    vcpu, t0, code, qual_base, rip, insn_json, handled_by, size, direction, string, rep, count = static
    reason = NAMES.get(code) or reason_name(code)
    fixed = [str(vcpu), reason, str(code), str(rip), insn_json, handled_by, str(size), direction,
             _BOOL[string], _BOOL[rep], str(count)]
    vcpu_s, reason, code_s, rip_s, insn_json, handled_s, size_s, direction, string_s, rep_s, count_s = (
        part.replace("%", "%%") for part in fixed)
    template = (f'{{"seq":%d,"t_ns":%d,"vcpu":{vcpu_s},"reason":"{reason}","reason_code":{code_s},'
                f'"qualification":%d,"rip":{rip_s},"insn":{insn_json},"handled_by":"{handled_s}",'
                f'"latency_ns":%d,"port":%d,"size":{size_s},"direction":"{direction}",'
                f'"string":{string_s},"rep":{rep_s},"count":{count_s},"data":%s}}\n')
    return template, t0, qual_base


def format_record(r: Record | tuple, sites: Sites | None = None) -> str:
    if len(r) == 6:  # a compact record of a site
        site_id, port, seq1, t_exit, t_entry, data = r
        template, t0, qual_base = sites[site_id]  # type: ignore[index]
        exit_ns, entry_ns = round(t_exit * 1e9), round(t_entry * 1e9)
        return template % (seq1 - 1, exit_ns - t0, qual_base | port << 16, entry_ns - exit_ns, port,
                           "null" if data is None else data)
    if r[0] == SITE_TAG:
        if sites is not None:
            sites[r[1]] = site_entry(tuple(r[2:]))
        return ""
    seq, t_ns, vcpu, code, qual, rip, insn_json, handled_by, latency, io, extra = r
    reason = NAMES.get(code) or reason_name(code)
    if io is not None:
        port, size, direction, string, rep, count, data = io
        line = (f'{{"seq":{seq},"t_ns":{t_ns},"vcpu":{vcpu},"reason":"{reason}","reason_code":{code},'
                f'"qualification":{qual},"rip":{rip},"insn":{insn_json},"handled_by":"{handled_by}",'
                f'"latency_ns":{latency},"port":{port},"size":{size},"direction":"{direction}",'
                f'"string":{_BOOL[string]},"rep":{_BOOL[rep]},"count":{count},'
                f'"data":{"null" if data is None else data}')
    else:
        line = (f'{{"seq":{seq},"t_ns":{t_ns},"vcpu":{vcpu},"reason":"{reason}","reason_code":{code},'
                f'"qualification":{qual},"rip":{rip},"insn":{insn_json},"handled_by":"{handled_by}",'
                f'"latency_ns":{latency}')
    if extra:
        line += "," + json.dumps(extra, separators=(",", ":"))[1:-1]
    return line + "}\n"


def format_records(records: Iterable[Record | tuple], sites: Sites | None = None) -> str:
    sites = {} if sites is None else sites
    return "".join([format_record(r, sites) for r in records])


def message(kind: bytes, payload: bytes) -> bytes:
    return MSG_HEAD.pack(kind, len(payload)) + payload


def read_messages(read: Callable[[int], bytes]) -> Iterator[tuple[bytes, bytes]]:
    """Split a message stream (read(n) as on a binary file) into (kind, payload) pairs."""
    while True:
        head = read(MSG_HEAD.size)
        if not head:
            return
        if len(head) != MSG_HEAD.size:
            raise TraceWriteError("trace stream ends inside a message head")
        kind, size = MSG_HEAD.unpack(head)
        payload = read(size) if size else b""
        if len(payload) != size:
            raise TraceWriteError(f"trace stream ends inside a message ({len(payload)} of {size} bytes)")
        yield kind, payload


def render_message(kind: bytes, payload: bytes, sites: Sites | None = None) -> str:
    """The JSON lines a message stands for ('' for the end message). `sites` carries the site
    definitions from one message to the next."""
    if kind == MSG_RECORDS:
        return format_records(marshal.loads(payload), sites)
    if kind == MSG_TEXT:
        return payload.decode("utf-8", "surrogatepass")
    if kind == MSG_END:
        return ""
    raise TraceWriteError(f"unknown trace message kind {kind!r}")


class TraceWriter:
    """Collects exit records and writes them as JSON lines.

    With `offload` (the default) the lines are formatted by a writer process, started once the
    first CHUNK of records is packed; until it reports ready (and whenever its pipe is full)
    packed records wait here, so the vCPU never waits for it to start. A trace that ends before
    the process is ready is formatted here instead, as with `offload=False` or when no process
    can be started. Every way produces the same bytes. The file is complete when close()
    returns; close() raises TraceWriteError if the writer process died or hung, so a trace is never
    silently truncated. add() is meant for one thread (the vCPU's); close() for after it ends.
    """

    def __init__(self, path: str | Path, header: dict[str, Any], offload: bool = True) -> None:
        self.path = Path(path)
        self._file: IO[str] = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._file.write(json.dumps({"trace": "hvmlab", "version": TRACE_VERSION, **header}) + "\n")
        self._pending: list[Record] = []
        self._offload = offload
        self._batch = BATCH if offload else FLUSH_EVERY
        self._packed = bytearray()  # messages not yet taken by the writer process
        self._sink: subprocess.Popen[bytes] | None = None
        self._pipe: IO[bytes] | None = None  # our end of the writer process's stdin
        self._ready = False  # the writer process said it is ready; only then is anything sent
        self._failure: str | None = None  # why the writer process lost records (raised by close())
        self.offload_error: str | None = None  # why formatting moved back in-process, if it did
        self.records = 0
        self._sites: Sites = {}  # site definitions seen by this process's formatter
        self._text_sites: Sites = {}  # every site registered (for batches formatted here)
        self._next_site = 0

    @property
    def offloaded(self) -> bool:
        """True while the lines are (or will be) formatted by a writer process."""
        return self._offload

    # -- the vCPU thread --------------------------------------------------------------------------
    def site(self, static: tuple) -> int:
        """Register a site (see SITE_TAG): returns its id for compact records."""
        site_id = self._next_site
        self._next_site += 1
        self._text_sites[site_id] = site_entry(static)
        self.add((SITE_TAG, site_id, *static))  # type: ignore[arg-type]
        self.records -= 1  # a definition is not an exit
        return site_id

    def add(self, record: Record) -> None:
        pending = self._pending
        pending.append(record)
        if len(pending) >= self._batch:
            self._drain()

    def _drain(self) -> None:
        if not self._offload:
            self._write_pending()
            return
        self._pack()
        if len(self._packed) >= CHUNK:
            self._ship()

    def _pack(self) -> None:
        pending = self._pending
        try:
            payload = marshal.dumps(pending, _MARSHAL_VERSION)
            kind = MSG_RECORDS
        except ValueError:  # something marshal cannot carry (an enum, a str subclass): send the lines
            definitions = [r for r in pending if r and r[0] == SITE_TAG]
            if definitions:  # the writer process still needs them for later compact records
                self._packed += message(MSG_RECORDS, marshal.dumps(definitions, _MARSHAL_VERSION))
            payload = format_records(pending, self._text_sites).encode("utf-8", "surrogatepass")
            kind = MSG_TEXT
        packed = self._packed
        packed += MSG_HEAD.pack(kind, len(payload))
        packed += payload
        self.records += len(pending)
        pending.clear()

    def _ship(self) -> None:
        """Pass packed messages on to the writer process (starting it the first time) as far as
        its pipe takes them without waiting; wait only when the backlog here grows too big."""
        if self._failure is not None:
            self._packed.clear()  # already lost: close() reports it
            return
        if self._sink is None and not self._spawn():
            self._fall_back(self.offload_error)
            return
        if not self._ready:
            state = self._check_ready(0.0)
            if state is False and len(self._packed) >= MAX_BACKLOG:
                state = self._check_ready(READY_TIMEOUT_S) or None
            if state is None:
                self._fall_back(self.offload_error)
            if not state:
                return
        packed = self._packed
        del packed[:self._send(packed, wait=False)]
        if len(packed) >= MAX_BACKLOG:
            del packed[:self._send(packed, wait=True)]

    def _write_pending(self) -> None:
        if self._pending:
            self._file.write(format_records(self._pending, self._sites))
            self.records += len(self._pending)
            self._pending.clear()

    def _write_packed(self) -> None:
        data, self._packed = self._packed, bytearray()
        for kind, payload in read_messages(BytesIO(data).read):
            self._file.write(render_message(kind, payload, self._sites))

    def _fall_back(self, why: str | None) -> None:
        """Format here from now on: no writer process could be started, or it was not ready
        (it was sent nothing, so nothing is lost). `why` is None for a trace that simply ended
        before the process was ready."""
        self.offload_error = why
        if self._sink is not None:
            self._stop_sink()
        self._write_packed()
        self._offload = False
        self._batch = FLUSH_EVERY

    # -- the writer process -----------------------------------------------------------------------
    def _spawn(self) -> bool:
        self._file.flush()  # the process appends through the same open file, after our header
        fd = self._file.fileno()
        read_end, write_end = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        try:
            # A session of its own: Ctrl-C in the terminal stops the guest, not the writer,
            # so the run still ends with a complete trace.
            self._sink = subprocess.Popen(
                [*WRITER_COMMAND, str(fd)], stdin=read_end,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(fd,), env=env,
                start_new_session=True)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            os.close(write_end)
            self.offload_error = f"cannot start the writer process: {exc}"
            return False
        finally:
            os.close(read_end)
        try:
            import fcntl
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except (ImportError, AttributeError, OSError):
            pass  # a smaller pipe only means more of the backlog waits here
        release_process(self._sink.pid)  # it formats beside the vCPU, not on its CPU
        os.set_blocking(write_end, False)
        assert self._sink.stdout is not None
        os.set_blocking(self._sink.stdout.fileno(), False)
        self._pipe = open(write_end, "wb", buffering=0)  # noqa: SIM115 - closed in _finish_sink()
        return True

    def _check_ready(self, timeout: float) -> bool | None:
        """Has the writer process said it is ready (waiting up to `timeout` s)? None if it
        ended without saying so."""
        assert self._sink is not None and self._sink.stdout is not None
        fd = self._sink.stdout.fileno()
        if timeout and not select.select([fd], [], [], timeout)[0]:
            self.offload_error = f"the writer process was not ready within {timeout:g} s"
            return False
        try:
            said = os.read(fd, 64)
        except BlockingIOError:
            return False
        if not said:
            self.offload_error = "the writer process ended before it was ready"
            return None
        self._ready = True
        return True

    def _send(self, data: bytearray, wait: bool) -> int:
        """Write `data` to the writer process: what its pipe takes now, or (`wait`) all of it,
        waiting while it makes progress. Returns the number of bytes written."""
        assert self._pipe is not None
        fd = self._pipe.fileno()
        done = 0
        with memoryview(data) as view:
            while done < len(view):
                try:
                    done += os.write(fd, view[done:])
                except BlockingIOError:
                    if not wait:
                        break
                    if not select.select([], [fd], [], SEND_TIMEOUT_S)[1]:
                        self._failure = f"it read nothing for {SEND_TIMEOUT_S:g} s"
                        break
                except OSError as exc:  # EPIPE: the process is gone
                    self._failure = f"its input closed ({exc.strerror or exc})"
                    break
        return done

    def _stop_sink(self) -> None:
        assert self._sink is not None and self._pipe is not None
        self._pipe.close()
        self._sink.kill()
        _, err = self._sink.communicate()
        said = err.decode("utf-8", "replace").strip().splitlines()
        if said and self.offload_error:
            self.offload_error += f": {said[-1]}"
        self._sink = self._pipe = None

    def _finish_sink(self) -> None:
        """Send the rest and the end, let the writer process drain and exit; raise TraceWriteError
        unless it ended cleanly."""
        sink, pipe = self._sink, self._pipe
        assert sink is not None and pipe is not None
        if self._failure is None:
            self._send(self._packed, wait=True)
        self._packed.clear()
        pipe.close()
        if self._failure is not None:
            sink.kill()  # what it has is incomplete anyway; do not wait on a stuck process
        try:
            _, err = sink.communicate(timeout=CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            sink.kill()
            _, err = sink.communicate()
            self._failure = self._failure or f"it did not finish within {CLOSE_TIMEOUT_S:g} s"
        if sink.returncode != 0 or self._failure is not None:
            status = (f"killed by signal {-sink.returncode}" if sink.returncode < 0
                      else f"exit status {sink.returncode}")
            said = err.decode("utf-8", "replace").strip().splitlines()
            why = "; ".join(filter(None, [self._failure, said[-1] if said else ""]))
            raise TraceWriteError(f"{self.path}: the trace writer process failed ({status}: {why}); "
                             "the trace file is incomplete")

    # -- public -----------------------------------------------------------------------------------
    def flush(self) -> None:
        """Pass every record added so far on toward the file: written here if no writer process
        runs yet, else handed to it (its lines are on disk once close() returns)."""
        if self._file.closed:
            return
        if self._pending:
            if self._offload:
                self._pack()
            else:
                self._write_pending()
        if self._sink is None:
            self._write_packed()
            self._file.flush()
        elif self._ready:
            del self._packed[:self._send(self._packed, wait=True)]
        if self._failure is not None:
            raise TraceWriteError(f"{self.path}: the trace writer process failed ({self._failure}); "
                             "the trace file is incomplete")

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self._file.closed:
            return
        footer = json.dumps({"summary": summary}) + "\n" if summary is not None else ""
        try:
            if self._pending and self._offload:
                self._pack()
            if self._sink is not None and not self._ready:
                state = self._check_ready(0.0)
                if not state:  # it was sent nothing: format the (short) trace here
                    self._fall_back(self.offload_error if state is None else None)
            if self._sink is None:
                self.flush()
                self._file.write(footer)
                return
            if footer:
                self._packed += message(MSG_TEXT, footer.encode("utf-8", "surrogatepass"))
            self._packed += message(MSG_END, b"")
            self._finish_sink()
        finally:
            self._file.close()
