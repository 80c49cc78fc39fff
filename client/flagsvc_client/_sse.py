"""A minimal Server-Sent Events parser (the WHATWG event-stream format)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    """One dispatched event; ``type`` is ``"comment"`` for ``:`` lines (heartbeats)."""

    type: str
    data: str
    id: str | None


def lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of a stream read in chunks of any size, without their terminators (CRLF, LF or
    CR). A line is given as soon as its terminator arrives; a CR at the end of a chunk waits for
    the next one, which may start with the LF of the same CRLF."""
    pending = b""
    for chunk in chunks:
        parts = (pending + chunk).splitlines(keepends=True)
        pending = b""
        if parts and (parts[-1].endswith(b"\r") or not parts[-1].endswith(b"\n")):
            pending = parts.pop()  # unfinished, or a CR whose LF may come next
        for part in parts:
            yield part.rstrip(b"\r\n")
    if pending:
        yield pending.rstrip(b"\r\n")


def parse(lines: Iterable[bytes | str]) -> Iterator[Event]:
    """Events from the stream's lines (without their line terminators)."""
    event_type, last_id = "", None
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if line == "":
            if data or event_type:
                yield Event(event_type or "message", "\n".join(data), last_id)
            event_type, data = "", []
            continue
        if line.startswith(":"):
            yield Event("comment", line[1:].strip(), last_id)
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event_type = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            last_id = value
