"""Server errors as Python exceptions that name what was wrong.

pyarrow reports a Flight status as its own exception types, with the gRPC wording around the
server's message. Here each status becomes the exception a Python user expects, carrying only the
server's message: a missing key is a `KeyError`, a bad filter a `ValueError`, a refused token or
write a `PermissionError`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight


class ArtiflightError(Exception):
    """Base of every error this package raises for a server's answer."""


class NotFoundError(ArtiflightError, KeyError):
    """No artifact, collection, version, element or variable by that name (NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidRequestError(ArtiflightError, ValueError):
    """A malformed request: bad filter, unknown column or field (INVALID_ARGUMENT)."""


class AccessDeniedError(ArtiflightError, PermissionError):
    """A path outside the server's roots, or a write with a read token (PERMISSION_DENIED)."""


class UnauthenticatedError(ArtiflightError, PermissionError):
    """A missing or wrong token on a server that runs with --auth (UNAUTHENTICATED)."""


class ServerBusyError(ArtiflightError, ConnectionError):
    """The server is unavailable, out of stream slots or memory, or past a time limit."""


class ServerError(ArtiflightError, RuntimeError):
    """An unreadable file or an internal failure on the server (INTERNAL, DATA_LOSS)."""


_PREFIX = re.compile(r"^Flight returned [a-z ]+ error, with message: ", re.S)
_DETAIL = re.compile(r"\. (gRPC client debug context|Detail): .*$", re.S)


def message(error: BaseException) -> str:
    """The server's own words, without the gRPC wording around them."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return _DETAIL.sub("", _PREFIX.sub("", text)).strip()


def translate(error: BaseException) -> BaseException:
    """The package's exception for a pyarrow/Flight exception (others are returned unchanged)."""
    text = message(error)
    if isinstance(error, KeyError):
        return NotFoundError(text)
    if isinstance(error, flight.FlightUnauthenticatedError):
        return UnauthenticatedError(text)
    if isinstance(error, flight.FlightUnauthorizedError):
        return AccessDeniedError(text)
    if isinstance(error, (flight.FlightUnavailableError, flight.FlightTimedOutError, flight.FlightCancelledError)):
        return ServerBusyError(text)
    if isinstance(error, pa.ArrowInvalid):
        return InvalidRequestError(text)
    if isinstance(error, (flight.FlightServerError, flight.FlightInternalError, pa.ArrowException)):
        if "resource exhausted" in str(error) or "deadline exceeded" in str(error):
            return ServerBusyError(text)
        return ServerError(text)
    return error


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Raises the package's exception in place of pyarrow's, the cause kept for debugging."""
    try:
        yield
    except (pa.ArrowException, flight.FlightError) as error:
        mapped = translate(error)
        if mapped is error:
            raise
        raise mapped from error
