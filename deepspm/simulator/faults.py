"""Faults the fake Nanonis server can inject into its replies (reference nanonis-tcp.md section 6.2).

Each fault is a small frozen dataclass; `FaultPlan` decides which faults apply to which call of a command.
How a fault acts is the server's business (see `FakeNanonisServer._respond`); the order of effects is:

    Delay -> NeverReply -> ErrorReply (else the handler runs) -> WrongName / BadBodySize -> Garbage
    -> CloseBeforeReply / CloseAfterHeader / CloseMidBody (cut the bytes, then close) -> Chunked -> Unsolicited

Several faults may apply to one call (e.g. `WrongName` and `Chunked`); `Delay`s add up.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

from deepspm.io.codec import NAME_SIZE


@dataclass(frozen=True)
class Delay:
    """Wait this long (s) before running the handler: a slow instrument or a blocking command."""

    seconds: float

    def __post_init__(self) -> None:
        if not self.seconds >= 0:
            raise ValueError(f"Delay needs seconds >= 0, got {self.seconds!r}")


@dataclass(frozen=True)
class NeverReply:
    """Keep the request pending until the connection closes; the handler never runs.

    Later requests on the same connection wait behind it (one request at a time), as on the real server.
    """


@dataclass(frozen=True)
class CloseBeforeReply:
    """Run the handler, then close the connection without sending a byte (outcome unknown to the client)."""


@dataclass(frozen=True)
class CloseAfterHeader:
    """Run the handler, send only the 40-byte reply header, then close."""


@dataclass(frozen=True)
class CloseMidBody:
    """Run the handler, send the header and the first `after_bytes` bytes of the body, then close."""

    after_bytes: int

    def __post_init__(self) -> None:
        if self.after_bytes < 0:
            raise ValueError(f"CloseMidBody needs after_bytes >= 0, got {self.after_bytes}")


@dataclass(frozen=True)
class Chunked:
    """Write the reply in pieces of `size` bytes, each write drained, `pause_s` apart (tests read loops).

    Both Python vendor clients break on a split header (reference 5.3); our client must not.
    """

    size: int
    pause_s: float = 0.0

    def __post_init__(self) -> None:
        if self.size < 1 or not self.pause_s >= 0:
            raise ValueError(f"Chunked needs size >= 1 and pause_s >= 0, got {self.size}, {self.pause_s}")


@dataclass(frozen=True)
class WrongName:
    """Echo this command name instead of the one received."""

    name: str

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > NAME_SIZE or not self.name.isascii():
            raise ValueError(f"WrongName needs 1..{NAME_SIZE} ASCII characters, got {self.name!r}")


@dataclass(frozen=True)
class BadBodySize:
    """Announce a body size of (true size + `delta`) in the header; the body itself is unchanged."""

    delta: int


@dataclass(frozen=True)
class ErrorReply:
    """Answer with status 1 and this description (full zero layout before it); the handler never runs.

    The message is sent as given, one byte per character: "" and non-UTF-8 text (e.g. "\\xe9") are allowed
    so that clients can be tested against them.
    """

    message: str = "Injected failure"


@dataclass(frozen=True)
class Garbage:
    """Send these bytes instead of the reply (the connection stays open)."""

    raw: bytes


@dataclass(frozen=True)
class Unsolicited:
    """Send these extra bytes, in a separate write, after a good reply."""

    raw: bytes


Fault: TypeAlias = (
    Delay | NeverReply | CloseBeforeReply | CloseAfterHeader | CloseMidBody | Chunked
    | WrongName | BadBodySize | ErrorReply | Garbage | Unsolicited
)
FAULT_TYPES: tuple[type, ...] = Fault.__args__

ANY_COMMAND = "*"


@dataclass
class _Injection:
    key: str  # lower-case command name, or ANY_COMMAND
    fault: Fault
    calls: frozenset[int] | None  # exact call numbers, or None
    remaining: int | None  # calls left when `calls` is None; None = forever

    def matches(self, key: str, call: int, seq: int) -> bool:
        if self.key == ANY_COMMAND:
            number = seq
        elif self.key == key:
            number = call
        else:
            return False
        if self.calls is not None:
            return number in self.calls
        return self.remaining is None or self.remaining > 0


class FaultPlan:
    """Which faults hit which calls. Call numbers start at 1 and count every request of that command
    (any case, any connection) since the server was created; for `ANY_COMMAND` they count every request."""

    def __init__(self) -> None:
        self._injections: list[_Injection] = []

    def add(self, key: str, fault: Fault, calls: Iterable[int] | None, times: int | None) -> None:
        if not isinstance(fault, FAULT_TYPES):
            raise TypeError(f"not a fault: {fault!r}")
        call_set = None
        if calls is not None:
            call_set = frozenset(int(c) for c in calls)
            if not call_set or min(call_set) < 1:
                raise ValueError(f"calls must be call numbers >= 1, got {sorted(call_set)}")
        elif times is not None and times < 1:
            raise ValueError(f"times must be >= 1 or None (every call), got {times}")
        self._injections.append(_Injection(key, fault, call_set, None if call_set is not None else times))

    def take(self, key: str, call: int, seq: int) -> tuple[Fault, ...]:
        """The faults for this call, in injection order; counted injections are used up."""
        hits = []
        for inj in self._injections:
            if inj.matches(key, call, seq):
                hits.append(inj.fault)
                if inj.remaining is not None:
                    inj.remaining -= 1
        self._injections = [i for i in self._injections if i.remaining is None or i.remaining > 0]
        return tuple(hits)

    def clear(self) -> None:
        self._injections.clear()

    def __len__(self) -> int:
        return len(self._injections)
