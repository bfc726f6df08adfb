"""
pgws: a WebSocket server that relays between browsers or services and PostgreSQL LISTEN/NOTIFY,
with every channel authorised by a JWT.

Embedding (see the README)::

    config = load_config(None, {}, {"db-uri": "...", "jwt-secret": "..."})
    relay = Relay(config, reactor)
    relay.setServiceParent(application)
    root.putChild(b"ws", relay.resource())
"""

from pgws.config import Config, ConfigError, load_config
from pgws.service import Relay

__all__ = ["Config", "ConfigError", "Relay", "load_config"]
__version__ = "0.1.0"
