"""
How C{twistd -n pgws} starts pgws: command-line options, and L{makeService}.

A configuration problem is one line on standard error and exit status 2, never a traceback (twistd
would otherwise print its whole usage text, or a traceback, for an error in one setting).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python import usage
from twisted.python.components import Componentized

from pgws._config import SETTINGS, Config, ConfigError, env_names, load_config
from pgws._embedded import EmbeddedPostgres, EmbeddedPostgresError
from pgws._logs import LogOutput, twistd_destination
from pgws._reactor import default_reactor
from pgws._service import Relay
from pgws._web import make_site

__all__ = ["Options", "makeService"]

_log = Logger()

EXIT_CONFIG = 2
# Twisted's default of 50 overflows in a burst of reconnecting clients (they then wait for SYN
# retransmits); the kernel caps it at net.core.somaxconn.
ACCEPT_BACKLOG = 4096
EXIT_START = 1


def _fail(message: str, status: int) -> None:
    # The real stderr: twistd's logging replaces sys.stderr once it has started.
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"pgws: {message}\n")
    stream.flush()
    if sys.stderr is not stream:
        _log.critical("{message}", message=message)
    raise SystemExit(status)


def _option_rows() -> list[list[Any]]:
    rows: list[list[Any]] = [["config", "c", None, "config file (key = value lines)"]]
    for s in SETTINGS:
        envs = ", ".join(env_names(s))
        rows.append([s.key, None, None, f"{s.help} [default: {s.default}] (env: {envs})"])
        for alias in s.aliases:
            rows.append([alias, None, None, f"same as --{s.key}"])
    return rows


class Options(usage.Options):
    synopsis = "[--config FILE] [--KEY VALUE ...]"
    longdesc = (
        "WebSocket <-> PostgreSQL LISTEN/NOTIFY relay with JWT-authorised channels. Every "
        "setting may come from the config file, a PGWS_* environment variable or the command "
        "line (highest precedence)."
    )
    optParameters = _option_rows()

    config: Config

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ
        self._cli: dict[str, Any] = {}

    def postOptions(self) -> None:
        self._cli = {k: v for k, v in self.items() if k != "config" and v is not None}
        try:
            self.config = self.reread()
        except ConfigError as e:
            _fail(str(e), EXIT_CONFIG)

    def reread(self) -> Config:
        """
        The configuration from the sources it came from at start: the same C{--config} file
        (read again), the environment and the command line; or a L{ConfigError}.
        """
        return load_config(self["config"], self._environ, self._cli)


class _EmbeddedPostgresService(service.Service):
    """
    Starts the private PostgreSQL before anything connects to it, and stops it last: only once
    the relay has flushed what clients sent (a MultiService stops its children all at once).
    """

    def __init__(self, launcher: EmbeddedPostgres) -> None:
        self.launcher = launcher
        self.relay: Relay | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        _log.info("Starting the embedded PostgreSQL")
        try:
            uri = self.launcher.start()
        except EmbeddedPostgresError as e:
            _fail(f"embedded PostgreSQL did not start: {e}", EXIT_START)
        _log.info("Embedded PostgreSQL ready at {uri}", uri=uri)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        flushed = self.relay.whenStopped() if self.relay is not None else defer.succeed(None)
        return flushed.addCallback(lambda _: self.launcher.stop())


def tls_options(certificate_file: str, key_file: str) -> Any:
    """
    TLS settings from PEM files: the first certificate of C{certificate_file} is the server's,
    any that follow are its chain.  A problem is a start-up error naming the file.
    """
    from twisted.internet import ssl

    try:
        with open(certificate_file, "rb") as f:
            pem = f.read()
        with open(key_file, "rb") as f:
            key_pem = f.read()
        blocks = [b"-----BEGIN CERTIFICATE-----" + part
                  for part in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]]
        if not blocks:
            raise ValueError("no PEM certificate in it")
        server = ssl.PrivateCertificate.loadPEM(blocks[0] + b"\n" + key_pem)
        chain = [ssl.Certificate.loadPEM(block).original for block in blocks[1:]]
        return ssl.CertificateOptions(
            privateKey=server.privateKey.original, certificate=server.original,
            extraCertChain=chain,
        )
    except Exception as e:  # OpenSSL's errors are many; each is a start-up error here
        _fail(f'"certificate-file"/"key-file": cannot use {certificate_file} with {key_file}: '
              f"{e or e.__class__.__name__}", EXIT_CONFIG)


def _listen_reusing_port(reactor: Any, config: Config, site: Any) -> Any:
    """
    A listening socket with SO_REUSEPORT, so that several pgws processes share one port and the
    kernel spreads connections over them (one process per core).
    """
    import socket

    from twisted.protocols.tls import TLSMemoryBIOFactory

    interface = config.listen_interface
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, config.server_port))
        sock.listen(ACCEPT_BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise CannotListenError(interface, config.server_port, e) from None
    factory = site
    if config.certificate_file and config.key_file:
        factory = TLSMemoryBIOFactory(tls_options(config.certificate_file, config.key_file),
                                      False, site)
    port = reactor.adoptStreamPort(sock.fileno(), family, factory)
    sock.close()  # the reactor holds its own duplicate
    return port


class _ListeningService(service.Service):
    """Binds the port before the reactor runs, so a taken port is a clean start-up failure."""

    def __init__(self, reactor: Any, config: Config, site: Any) -> None:
        self._reactor = reactor
        self._config = config
        self._site = site
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        config = self._config
        try:
            if config.reuse_port:
                self.port = _listen_reusing_port(self._reactor, config, self._site)
            elif config.certificate_file and config.key_file:
                self.port = self._reactor.listenSSL(
                    config.server_port, self._site, tls_options(config.certificate_file,
                                                                config.key_file),
                    backlog=ACCEPT_BACKLOG, interface=config.listen_interface,
                )
            else:
                self.port = self._reactor.listenTCP(
                    config.server_port, self._site, backlog=ACCEPT_BACKLOG,
                    interface=config.listen_interface,
                )
        except CannotListenError as e:
            _fail(f'"server-port": cannot listen on {self._config.server_host} port '
                  f"{self._config.server_port}: {e.socketError}", EXIT_START)
        scheme = "wss/https" if config.certificate_file else "ws/http"
        _log.info("Listening on port {port} ({scheme})", port=self.port.getHost().port,
                  scheme=scheme)

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None


def raise_open_files_limit() -> None:
    """Thousands of sockets need thousands of descriptors: take the soft limit up to the hard."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        _log.info("Open-files limit raised from {soft} to {hard}", soft=soft, hard=hard)


class _GracefulExit(service.Service):
    """
    SIGTERM and SIGINT stop the reactor (so every service stops gracefully) and pgws exits 0:
    twistd's own handlers make it re-raise the signal and die by it, which supervisors read as a
    crash.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        import signal

        def stop(signum: int, frame: Any) -> None:
            _log.info("Signal {signum}: shutting down", signum=signum)
            self._reactor.callFromThread(self._reactor.stop)

        # Installed once the reactor runs, over the handlers it installs itself.
        self._reactor.callWhenRunning(signal.signal, signal.SIGTERM, stop)
        self._reactor.callWhenRunning(signal.signal, signal.SIGINT, stop)


class _Application(service.MultiService):
    """
    The top service.  twistd makes it a child of its application, and only then asks the
    application for a log observer: pgws's (L{pgws._logs}) is set there, so that C{log-format}
    and C{log-level} apply to everything twistd logs.

    @param twistd_options: twistd's own options (where it logs), when twistd runs pgws.
    """

    def __init__(self, config: Config, twistd_options: Mapping[str, Any] | None) -> None:
        super().__init__()
        self._config = config
        self._twistd_options = twistd_options
        self.logs: LogOutput | None = None

    def setServiceParent(self, parent: Any) -> None:
        config, options = self._config, self._twistd_options
        if options is not None and isinstance(parent, Componentized) and \
                parent.getComponent(ILogObserver) is None:
            out = twistd_destination(options)
            if out is not None:
                self.logs = LogOutput(out, config.log_format, config.log_level)
                parent.setComponent(ILogObserver, self.logs)
            elif (config.log_format, config.log_level) != ("text", "info"):
                _log.warn("log-format and log-level apply to twistd's log file or standard "
                          "output only, not to --syslog or --logger")
        super().setServiceParent(parent)


class _Reloading(service.Service):
    """
    SIGHUP re-reads the configuration (L{Options.reread}) and applies what may change while
    every socket stays open (L{Relay.reload}, then the log settings).  An invalid configuration
    changes nothing and is one line in the log.
    """

    def __init__(self, reactor: Any, options: Options, relay: Relay, top: _Application) -> None:
        self._reactor = reactor
        self._options = options
        self._relay = relay
        self._top = top

    def startService(self) -> None:
        super().startService()
        import signal

        def reload(signum: int, frame: Any) -> None:
            self._reactor.callFromThread(self.reload)

        self._reactor.callWhenRunning(signal.signal, signal.SIGHUP, reload)

    def reload(self) -> None:
        logs, louder = self._top.logs, None
        try:
            config = self._options.reread()
            wanted = (config.log_format, config.log_level)
            before = logs.settings if logs is not None else wanted
            if logs is not None and before != wanted and \
                    LogLevel.levelWithName(wanted[1]) <= LogLevel.levelWithName(before[1]):
                # What the reload says is said under the more verbose of the two levels.
                louder = before
                logs.apply(*wanted)
            self._relay.reload(config)
        except ConfigError as e:
            if logs is not None and louder is not None:
                logs.apply(*louder)  # the reload was refused: the level it had
            _log.error("Configuration not reloaded, nothing changed: {why}", why=str(e))
            return
        if logs is None or before == wanted:
            return
        _log.info("Logging from now on with log-format {kind}, log-level {least}",
                  kind=wanted[0], least=wanted[1])
        logs.apply(*wanted)


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    """The whole server: [embedded PostgreSQL], the relay, the listening port."""
    reactor = default_reactor(reactor)
    config = options.config
    raise_open_files_limit()
    top = _Application(config, options.parent)
    _GracefulExit(reactor).setServiceParent(top)
    db_uri = config.db_uri
    if config.embedded:
        from pathlib import Path

        launcher = EmbeddedPostgres(
            data_dir=Path(config.embedded_data_dir) if config.embedded_data_dir else None,
            port=config.embedded_port,
        )
        embedded = _EmbeddedPostgresService(launcher)
        embedded.setServiceParent(top)
        db_uri = launcher.uri
    try:
        relay = Relay(config, reactor=reactor, db_uri=db_uri)
    except ConfigError as e:  # the keys are parsed here (JWK/JWKS)
        _fail(str(e), EXIT_CONFIG)
    relay.setServiceParent(top)
    _Reloading(reactor, options, relay, top).setServiceParent(top)
    if config.embedded:
        embedded.relay = relay

    def exit_status() -> None:
        # twistd exits 0 after reactor.stop(); a relay that gave up must exit non-zero.
        if relay.exit_status:
            os._exit(relay.exit_status)

    reactor.addSystemEventTrigger("after", "shutdown", exit_status)
    _ListeningService(reactor, config, make_site(relay.resource())).setServiceParent(top)
    return top
