"""
pgws: a WebSocket server that relays between browsers or services and PostgreSQL LISTEN/NOTIFY,
with every channel authorised by a JWT.

Embedding: see the README's "Embedding" section, which a test runs as written.
"""

from pgws.config import Config, ConfigError, load_config
from pgws.service import Relay
from pgws.web import make_site

__all__ = ["Config", "ConfigError", "Relay", "load_config", "make_site"]
__version__ = "0.1.0"
