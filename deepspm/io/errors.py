"""Typed errors of the instrument layer. Each names what went wrong; none is retried blindly."""

from __future__ import annotations


class InstrumentError(Exception):
    """Base of every error raised by deepspm.io."""


class ProtocolError(InstrumentError):
    """Bytes that do not follow the Nanonis wire format (bad header, wrong echo, truncated body, ...).

    `raw` keeps the offending bytes (possibly truncated) for the journal.
    """

    def __init__(self, message: str, raw: bytes = b"") -> None:
        super().__init__(message)
        self.raw = raw


class ArgumentError(InstrumentError, ValueError):
    """A value that cannot be encoded as its wire type (wrong type, out of the type's range, non-ASCII text)."""


class NanonisError(InstrumentError):
    """The server answered with error status 1."""

    def __init__(self, command: str, code: int, message: str) -> None:
        super().__init__(f"{command}: Nanonis error {code}: {message!r}")
        self.command = command
        self.code = code
        self.message = message


class CommandTimeout(InstrumentError):
    """No complete reply within the command's deadline. The outcome of the command is unknown."""

    def __init__(self, command: str, timeout_s: float) -> None:
        super().__init__(f"{command}: no reply within {timeout_s:.3g} s (outcome unknown, connection closed)")
        self.command = command
        self.timeout_s = timeout_s


class ConnectionLost(InstrumentError):
    """The connection closed or broke while a command was in flight. The outcome is unknown."""

    def __init__(self, command: str | None, reason: str) -> None:
        where = f"{command}: " if command else ""
        super().__init__(f"{where}connection lost ({reason}); outcome unknown")
        self.command = command
        self.reason = reason


class Interrupted(ConnectionLost):
    """The controller was killed while the command was in flight; found on resume. Not an instrument fault."""

    def __init__(self, command: str) -> None:
        super().__init__(command, "the run was interrupted during this command")


class UnsupportedCommand(InstrumentError):
    """The command is not in the table, or not available in the server's protocol version."""


class SafetyError(InstrumentError):
    """A request outside the safety envelope. Raised before a single byte reaches the wire."""

    def __init__(self, command: str, rule: str, detail: str) -> None:
        super().__init__(f"{command} refused by safety rule {rule!r}: {detail}")
        self.command = command
        self.rule = rule
        self.detail = detail
