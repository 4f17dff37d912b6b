"""The trace writer process: turns the packed exit records a TraceWriter sends on stdin into JSON lines (wire format in hvm.trace)."""

from __future__ import annotations

import os
import sys

from .trace import MSG_END, TraceWriteError, read_messages, render_message

USAGE = "usage: python -m hvm.trace_sink FD  (FD: the trace file, open for writing, inherited)"
READY = b"ready\n"  # on stdout once the file is open: from then on the TraceWriter sends records


def main(argv: list[str]) -> int:
    """Append every message's lines to the file on descriptor argv[1]; 0 once the end message
    has been written, 1 if the input stopped before it (what arrived is still written)."""
    if len(argv) != 2 or not argv[1].isdigit():
        print(USAGE, file=sys.stderr)
        return 2
    # The same text layer as the in-process writer (UTF-8, newline translation) so the bytes match.
    with open(int(argv[1]), "w", encoding="utf-8") as out:
        os.write(sys.stdout.fileno(), READY)
        sites: dict = {}  # site definitions, kept from one message to the next
        try:
            for kind, payload in read_messages(sys.stdin.buffer.read):
                if kind == MSG_END:
                    return 0
                out.write(render_message(kind, payload, sites))
        except TraceWriteError as exc:
            print(f"hvm.trace_sink: {exc}", file=sys.stderr)
            return 1
    print("hvm.trace_sink: input ended before the end of the trace", file=sys.stderr)
    return 1


if __name__ == "__main__":
    status = main(sys.argv)
    sys.stderr.flush()
    os._exit(status)  # the file is closed; skip interpreter teardown, the TraceWriter waits for it
