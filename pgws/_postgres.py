"""
What the LISTEN session and the NOTIFY pool share about talking to PostgreSQL through txpostgres:
the connection settings, how a database error is described, and a connection whose death is a
log line rather than a traceback.
"""

from __future__ import annotations

from typing import Any

import psycopg2
from psycopg2.extensions import parse_dsn
from twisted.internet import defer
from twisted.logger import Logger
from txpostgres.reconnection import ConnectionDead
from txpostgres.txpostgres import Connection

__all__ = ["QuietConnection", "close_quietly", "connect_kwargs", "connection_trouble", "describe_dsn",
           "describe_error"]

_log = Logger()


def close_quietly(conn: Any) -> None:
    """Close a txpostgres connection that may be dead or closed already: nothing more to do."""
    try:
        conn.close()
    except Exception:
        pass


def connect_kwargs(application_name: str) -> dict[str, Any]:
    """
    Connection settings added to the user's DSN.  They live in the connection string (not in
    C{SET} commands, which txpostgres loses on a reconnect) so that they survive a reconnect.
    Keepalives make a link that died without closing show up as an error within seconds instead
    of hours.
    """
    return {
        "application_name": application_name,
        "client_encoding": "UTF8",
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "connect_timeout": 10,
    }


def describe_dsn(dsn: str) -> str:
    """Where a DSN points, for logs: never the password."""
    try:
        parts = parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "an unparsable database URI"
    host = parts.get("host", "local socket")
    port = parts.get("port", "5432")
    return f"{parts.get('user', '?')}@{host}:{port}/{parts.get('dbname', '?')}"


def describe_error(failure_or_exc: object) -> str:
    """The first line of a database error, safe to log and to put in a close reason."""
    exc = getattr(failure_or_exc, "value", failure_or_exc)
    text = getattr(exc, "pgerror", None) or str(exc) or exc.__class__.__name__
    return text.strip().splitlines()[0] if text.strip() else exc.__class__.__name__


def connection_trouble(exc: BaseException) -> bool:
    """Errors that mean "the database is away", worth waiting out, unlike a refused statement."""
    return isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError, ConnectionDead,
                            defer.CancelledError))


class QuietConnection(Connection):  # type: ignore[misc]  # txpostgres is untyped
    """
    A connection whose death is reported as a one-line warning, not as the reactor's "Unhandled
    Error" traceback: returning the exception from C{doRead} makes the reactor call
    C{connectionLost} with it, and a reconnection detector (or the listener) then reconnects.
    """

    prefix = "database connection"

    def doRead(self) -> Any:
        try:
            super().doRead()
        except psycopg2.Error as e:
            _log.warn("{name} lost its database connection: {why}", name=self.prefix,
                      why=describe_error(e))
            return e
        return None
