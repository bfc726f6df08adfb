"""
pgws: a WebSocket server that relays between browsers or services and PostgreSQL LISTEN/NOTIFY,
with every channel authorised by a JWT.

This module is the public surface: everything else lives in private C{pgws._*} modules, whose
names and contents may change between releases.  Embedding: see the README's "Embedding" section,
which a test runs as written.  The Python client is L{pgws.client}.

The server's names are imported on first use (PEP 562): importing C{pgws.client} runs this module,
and must not import the server, which loads Autobahn on Twisted.  Autobahn's txaio picks one
framework per process and refuses a second, so the asyncio client could not load after it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgws._config import Config, ConfigError, load_config
    from pgws._embedded import EmbeddedPostgres, EmbeddedPostgresError
    from pgws._service import Relay
    from pgws._web import RelayResource, make_site

__all__ = [
    "Config",
    "ConfigError",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "Relay",
    "RelayResource",
    "load_config",
    "make_site",
]
__version__ = "0.1.0"

_HOMES = {
    "Config": "pgws._config",
    "ConfigError": "pgws._config",
    "load_config": "pgws._config",
    "EmbeddedPostgres": "pgws._embedded",
    "EmbeddedPostgresError": "pgws._embedded",
    "Relay": "pgws._service",
    "RelayResource": "pgws._web",
    "make_site": "pgws._web",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'pgws' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
