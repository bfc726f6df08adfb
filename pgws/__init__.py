"""
pgws: a WebSocket server that relays between browsers or services and PostgreSQL LISTEN/NOTIFY,
with every channel authorised by a JWT.

This module is the public surface: everything else lives in private C{pgws._*} modules, whose
names and contents may change between releases.  Embedding: see the README's "Embedding" section,
which a test runs as written.
"""

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
