"""twistd finds pgws here: C{twistd -n pgws --config sample.conf}."""

from twisted.application.service import ServiceMaker

pgws = ServiceMaker("pgws", "pgws._tap", "WebSocket <-> PostgreSQL LISTEN/NOTIFY relay", "pgws")
