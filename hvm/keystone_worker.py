"""Keystone (x86, NASM syntax) run in a child process so that every call is bounded in time."""

# Keystone 0.9.2 can spin forever inside ks_asm() on some input (it hangs on "%define").
# A C call cannot be interrupted from Python, so it runs in a child process: the parent waits
# for each answer with a deadline and kills the child when one is late. The child exits by
# itself when its stdin closes or its parent dies, so no stray process outlives hvmlab.

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

KEYSTONE_TIMEOUT = 5.0  # seconds allowed for each instruction (and for the child to start)


class KeystoneTimeout(Exception):
    """Keystone gave no answer for texts[index] within `timeout` seconds; the child is killed."""

    def __init__(self, index: int, timeout: float) -> None:
        super().__init__(f"keystone did not answer within {timeout:g} s")
        self.index = index
        self.timeout = timeout


class KeystoneUnavailable(Exception):
    """The child could not be started or died without answering."""


@dataclass(frozen=True)
class KsResult:
    data: bytes | None   # the encoding, or None when keystone rejected the text
    error: str = ""      # keystone's message when data is None


class KeystoneWorker:
    """A client of one child process; assemble() sends one batch and reads one answer per text."""

    def __init__(self, timeout: float = KEYSTONE_TIMEOUT,
                 argv: Sequence[str] | None = None) -> None:
        self.timeout = timeout
        # -P: the child must not see hvm/ as a top-level path (hvm/platform.py would shadow
        # the standard library's platform module that keystone imports).
        self.argv = list(argv) if argv is not None else [sys.executable, "-u", "-P", __file__]
        self.proc: subprocess.Popen[bytes] | None = None
        self.round_trips = 0   # batches sent, for callers that check how chatty they are
        # (bits, text) -> answer; keystone is deterministic, so answers are kept for reuse.
        self.cache: dict[tuple[int, str], KsResult] = {}
        self._buf = b""
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _start(self) -> subprocess.Popen[bytes]:
        if self.proc is None or self.proc.poll() is not None:
            try:
                self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            except OSError as e:
                raise KeystoneUnavailable(f"cannot start keystone worker: {e}") from e
            self._buf = b""
        return self.proc

    @staticmethod
    def _last_words(proc: subprocess.Popen[bytes]) -> str:
        """The last line the dead child wrote to stderr (e.g. why keystone would not load)."""
        try:
            proc.wait(timeout=1.0)
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        except (OSError, subprocess.TimeoutExpired):
            return ""
        lines = [line for line in err.splitlines() if line.strip()]
        return f": {lines[-1].strip()}" if lines else ""

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()

    def close(self) -> None:
        """Stop the child: close its stdin (it exits), kill it if it does not."""
        with self._lock:
            proc = self.proc
            if proc is not None and proc.poll() is None and proc.stdin is not None:
                try:
                    proc.stdin.close()
                    proc.wait(timeout=1.0)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            self._kill()

    def _read_line(self, proc: subprocess.Popen[bytes], deadline: float) -> bytes | None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise KeystoneUnavailable("keystone worker exited without answering"
                                          + self._last_words(proc))
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def assemble(self, bits: int, texts: Sequence[str]) -> list[KsResult]:
        """Encode each text (one instruction, numbers only, no directives) for 16/32/64 bits."""
        if not texts:
            return []
        with self._lock:
            proc = self._start()
            assert proc.stdin is not None
            self.round_trips += 1
            request = json.dumps({"bits": bits, "texts": list(texts)}) + "\n"
            try:
                proc.stdin.write(request.encode())
                proc.stdin.flush()
            except OSError as e:
                self._kill()
                raise KeystoneUnavailable(f"keystone worker is gone: {e}") from e
            results: list[KsResult] = []
            for index in range(len(texts)):
                try:
                    line = self._read_line(proc, time.monotonic() + self.timeout)
                except KeystoneUnavailable:
                    self._kill()
                    raise
                if line is None:
                    self._kill()
                    raise KeystoneTimeout(index, self.timeout)
                answer = json.loads(line)
                if "hex" in answer:
                    results.append(KsResult(bytes.fromhex(answer["hex"])))
                else:
                    results.append(KsResult(None, str(answer.get("error", "rejected"))))
            return results


_default: KeystoneWorker | None = None
_default_pid = 0
_default_lock = threading.Lock()


def default_worker() -> KeystoneWorker:
    """The process-wide worker the assembler uses (started on first use, stopped at exit)."""
    global _default, _default_pid
    with _default_lock:
        if _default is None or _default_pid != os.getpid():   # a forked child gets its own
            _default, _default_pid = KeystoneWorker(), os.getpid()
            atexit.register(_default.close)
        return _default


# ----------------------------------------------------------------------------------------------
# The child side: python3 keystone_worker.py, one JSON request per line on stdin.

def _watch_parent(parent: int) -> None:
    # If the parent dies while keystone spins, stdin EOF is never read: exit from here.
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def _child_main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    import keystone  # only the child loads keystone

    modes = {16: keystone.KS_MODE_16, 32: keystone.KS_MODE_32, 64: keystone.KS_MODE_64}
    engines: dict[int, keystone.Ks] = {}
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    out = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        bits = int(request["bits"])
        if bits not in engines:
            ks = keystone.Ks(keystone.KS_ARCH_X86, modes[bits])
            ks.syntax = keystone.KS_OPT_SYNTAX_NASM
            engines[bits] = ks
        for text in request["texts"]:
            try:
                encoding, _ = engines[bits].asm(text, 0)
                answer = ({"hex": bytes(encoding).hex()} if encoding
                          else {"error": "keystone produced no bytes"})
            except keystone.KsError as e:
                answer = {"error": str(e)}
            out.write(json.dumps(answer) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
