"""Broker lifecycle: build the pipeline, serve gRPC, supervise background loops, stop cleanly.

Shutdown order (SIGTERM/SIGINT): leave the registry (ZooKeeper: the broker's ephemeral
nodes are deleted, so clients stop choosing it) → health NOT_SERVING and refuse new
publishes (retriable NOT_SERVING) → wait for publishes already accepted to be stored and
acked → start no new pushes and give in-flight deliveries time to be acked → close the
streams → write the bookkeeping of what is still in memory → stop the registry (close the
ZooKeeper session) → close the store.
Every step is bounded, so the process exits within ``grace`` plus a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kiteq.binding.base import BindingRegistry, BrokerInfo, BrokerRegistration
from kiteq.binding.match import BindingLimits, BindingTable
from kiteq.binding.registry import open_registry
from kiteq.broker import upkeep
from kiteq.broker.address import advertised_address, is_loopback, split_bind
from kiteq.broker.admin_service import AdminService
from kiteq.broker.console_source import BrokerConsole
from kiteq.broker.heap import HeapTrimmer
from kiteq.broker.http_publish import HttpPublishServer, server_ssl_context
from kiteq.broker.rejections import RejectionLog
from kiteq.broker.service import (
    KEEPALIVE_TIME_MS,
    KEEPALIVE_TIMEOUT_MS,
    MAX_PING_STRIKES,
    MIN_PING_INTERVAL_MS,
    PROTOCOL_VERSION,
    BrokerService,
    add_to_server as add_broker_service,
)
from kiteq.broker.stats import StatsView
from kiteq.broker.webhooks import install_configured_webhooks, open_webhooks
from kiteq.core.clock import Clock, SystemClock
from kiteq.core.config import ANY_TOPIC, CLUSTER_DEFAULTS, ClusterConfig
from kiteq.core.errors import ConfigError
from kiteq.core.limits import MAX_FRAME_BYTES
from kiteq.core.tls import ServerTls, TlsMode, load_server_tls
from kiteq.handler.core import BrokerCore
from kiteq.handler.takeover import TakeoverLoop
from kiteq.handler.webhook import WebhookSinks
from kiteq.ops.health import Component, HealthReport
from kiteq.ops.http import OpsServer
from kiteq.ops.metrics import BrokerMetrics
from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc, broker_pb2
from kiteq.store.base import MessageStore, TakenOver
from kiteq.store.url import open_store, store_ownership

logger = logging.getLogger(__name__)

VERSION: Final = "0.1.0"
_STATS_TICK: Final = 5.0
# how often a shutdown that waits says what for
_DRAIN_REPORT_PERIOD: Final = 1.0
SERVER_OPTIONS: Final = [
    ("grpc.max_receive_message_length", MAX_FRAME_BYTES),
    ("grpc.max_send_message_length", MAX_FRAME_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
    ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
    # a second broker on the same port must fail loudly, not share it
    ("grpc.so_reuseport", 0),
]


def check_admin_protection(config: ClusterConfig) -> None:
    """Refuse to run a production-shaped cluster whose admin service nobody protects.

    Raises:
        ConfigError: Not a dev cluster (``ClusterConfig.dev``), no admin secret and no
            ``adminOpen = true``; the message names the keys.
    """
    if config.admin_secret or config.admin_open or config.dev:
        return
    raise ConfigError(
        f"clusters.{config.name}.adminSecret: a production-shaped cluster (checks group "
        "secrets, name not *_dev) needs an admin secret: set adminSecret or adminSecretFile, "
        "or KITEQ_ADMIN_SECRET, or -adminSecretFile; adminOpen = true runs the admin "
        "service open"
    )


def server_tls(config: ClusterConfig) -> ServerTls | None:
    """The gRPC port's TLS material from the config (None: plaintext).

    Raises:
        ConfigError: Names the key whose file is missing, unreadable or invalid.
    """
    return load_server_tls(
        config.tls_cert, config.tls_key, config.tls_client_ca, prefix=f"clusters.{config.name}"
    )


class Broker:
    """The broker: gRPC on *bind*, the ops port on *pport*, the HTTP publish API on *hport*.

    For *pport* and *hport* (the ``-pport``/``-hport`` flags), as for *bind*'s port, 0 is
    a port the OS picks (``ops_address``/``http_address`` say which); negative: off.
    *hport* None: the config's ``hport`` (0 there is off).
    """

    def __init__(
        self,
        config: ClusterConfig,
        *,
        bind: str,
        pport: int = -1,
        hport: int | None = None,
        clock: Clock | None = None,
        grace: float = 10.0,
    ) -> None:
        self.config = config
        self._bind_host, self._bind_port = split_bind(bind)
        self._pport = pport
        self._hport = (config.hport or -1) if hport is None else hport
        self._clock = clock or SystemClock()
        self._grace = grace
        self._started = time.monotonic()
        self._stopping = asyncio.Event()
        self._failure: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.metrics = BrokerMetrics()
        self.port = 0
        self.advertised = ""
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._ops: OpsServer | None = None
        self._http: HttpPublishServer | None = None
        self._store: MessageStore | None = None
        self._registry: BindingRegistry | None = None
        self._registration: BrokerRegistration | None = None
        self._backlog: dict[str, int] = {}
        self._dead_letters: dict[tuple[str, str], int] = {}
        self._takeover: TakeoverLoop | None = None
        self._core: BrokerCore | None = None
        self._webhooks: WebhookSinks | None = None
        # health: registration done; the last successful periodic store read (monotonic)
        self._registered = False
        self._store_ok_at: float | None = None
        self.owner = ""
        self.tls_mode = TlsMode.OFF

    # -- start ---------------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        check_admin_protection(config)
        tls = server_tls(config)
        # the port first: the broker's owner name in the store is its address
        server = grpc.aio.server(options=SERVER_OPTIONS)
        self._server = server
        try:
            # no host in -bind means every interface, as KiteQ's :13800
            listen = f"{self._bind_host or '0.0.0.0'}:{self._bind_port}"  # noqa: S104
            if tls is None:
                self.port = server.add_insecure_port(listen)
            else:
                credentials = grpc.ssl_server_credentials(
                    [(tls.key, tls.cert)],
                    root_certificates=tls.client_ca,
                    require_client_auth=tls.client_ca is not None,
                )
                self.port = server.add_secure_port(listen, credentials)
                self.tls_mode = tls.mode
        except RuntimeError as exc:
            raise ConfigError(
                f"-bind: cannot listen on {self._bind_host}:{self._bind_port}: {exc}"
            ) from exc
        self.advertised = advertised_address(self._bind_host, self.port)
        self._warn_unprotected()
        for key in config.ignored:
            logger.warning(
                "clusters.%s.%s: accepted for KiteQ compatibility and ignored (%s)",
                config.name,
                key,
                CLUSTER_DEFAULTS[key][1],
            )
        ownership = store_ownership(config.db, self.advertised)
        self.owner = ownership.owner
        self._store = store = open_store(ownership.url)
        await store.open()
        if ownership.adopts_host_rows:
            # rows of this host's name (KiteQ's owner, and ours before owners were
            # addresses) are adopted by the broker that starts on this host
            legacy = socket.gethostname()
            adopted = (await store.take_over(legacy)).rows
            if adopted:
                logger.info("adopted %d stored rows of kite_server=%r", adopted, legacy)
        if not store.durable:
            logger.warning(
                "store %s is not durable: stored messages are lost when the broker exits",
                store.description,
            )
        bindings = BindingTable(
            limits=BindingLimits(config.max_bindings_per_group_topic, config.max_pattern_length),
            permissions=config.acl,
            webhooks=config.webhook_policy,
            on_refused=lambda reason: self.metrics.bindings_refused(reason.value),
        )
        self._registry = registry = open_registry(config.registry, store, topics=config.topics)
        await registry.start(bindings)
        install_configured_webhooks(bindings, config)
        self._core = core = BrokerCore(
            config=config,
            store=store,
            bindings=bindings,
            clock=self._clock,
            server_name=self.owner,
            metrics=self.metrics,
        )
        await core.load()
        add_broker_service(
            BrokerService(
                core=core, advertised=self.advertised, registry=registry, metrics=self.metrics
            ),
            server,
        )
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminService(
                core=core, advertised=self.advertised, uptime=self._uptime, registry=registry
            ),
            server,
        )
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        services = (
            broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(services, server)
        await server.start()
        for name in ("", services[0], services[1]):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for name, loop in core.loops().items():
            self._spawn(name, loop)
        self._webhooks = open_webhooks(core, self.metrics)
        self._webhooks.start()
        self._spawn("stats", self._stats_loop)
        self._spawn("history", lambda: upkeep.prune_history(core, self._store_or_fail))
        self._spawn(
            "dedup", lambda: upkeep.prune_remembered(core, self._store_or_fail, self.metrics)
        )
        self._spawn("summaries", lambda: upkeep.summarize(core))
        trimmer = HeapTrimmer(
            lambda: core.intake.received + core.dispatcher.tally.delivered,
            lambda: self._store_or_fail().release_memory(),
        )
        if trimmer.available:
            self._spawn("heap", trimmer.run)
        if self._pport >= 0:
            stats = StatsView(
                core=core, backlog=lambda: self._backlog, dead_letters=lambda: self._dead_letters
            )
            console = BrokerConsole(
                core=core,
                advertised=self.advertised,
                registry=registry,
                uptime=self._uptime,
                backlog=lambda: self._backlog,
                dead_letters=lambda: self._dead_letters,
            )
            self._ops = OpsServer(
                self._bind_host or "0.0.0.0",  # noqa: S104
                self._pport,
                self.metrics,
                stats,
                console=console,
                admin_secret=config.admin_secret,
                health=self,
            )
            await self._ops.start()
        if self._hport >= 0:
            await self._start_http(core)
        self.metrics.set_info(VERSION, config.name, store.description)
        takeover_nodes = registry.takeover_nodes()
        if config.takeover and ownership.sharing is not None and takeover_nodes is not None:
            # announced before the alive node: a new incarnation is never taken for an old
            self._takeover = TakeoverLoop(
                nodes=takeover_nodes,
                store=store,
                address=self.advertised,
                owner=self.owner,
                store_id=ownership.sharing,
                grace=config.takeover_grace_seconds,
                on_taken=self._taken_over,
            )
            await self._takeover.start()
            self._spawn("takeover", self._takeover.run)
        # announced last: clients may choose this broker from now on
        self._registration = registry.registration
        await self._registration.register(
            BrokerInfo(
                address=self.advertised,
                protocol_version=PROTOCOL_VERSION,
                proto=broker_pb2.DESCRIPTOR.package,
            )
        )
        self._registered = True

    async def _start_http(self, core: BrokerCore) -> None:
        """Serve the HTTP publish API on ``hport`` (HTTPS with the gRPC port's TLS files)."""
        config = self.config
        self._http = HttpPublishServer(
            self._bind_host or "0.0.0.0",  # noqa: S104
            self._hport,
            core=core,
            rejections=RejectionLog(core.clock, self.metrics),
            metrics=self.metrics,
            ssl_context=server_ssl_context(config),
        )
        try:
            await self._http.start()
        except OSError as exc:
            raise ConfigError(f"-hport: cannot listen on port {self._hport}: {exc}") from exc
        if self._http.scheme == "http" and not is_loopback(self._bind_host) and not config.dev:
            logger.warning(
                "HTTP publish port %d is plaintext: group secrets cross the network in "
                "cleartext (set tlsCert and tlsKey)",
                self._http.port,
            )

    @property
    def ops_address(self) -> str:
        """``http://host:port`` of the ops port; empty when it is off."""
        if self._ops is None:
            return ""
        return f"http://{advertised_address(self._bind_host, self._ops.port)}"

    @property
    def http_address(self) -> str:
        """``<scheme>://host:port`` of the HTTP publish API; empty when it is off."""
        if self._http is None:
            return ""
        return f"{self._http.scheme}://{advertised_address(self._bind_host, self._http.port)}"

    def health_report(self) -> HealthReport:
        """For ``/healthz`` and ``/readyz``: from state kept in memory, no store call.

        The store counts as down when the periodic stats read (``_stats_loop``) has not
        succeeded for three of its periods: a store that hangs or refuses shows here.
        """
        if self._failure is not None:
            broker = Component.DOWN
        elif self._stopping.is_set() or (
            self._core is not None and not self._core.intake.accepting
        ):
            broker = Component.DRAINING
        elif not self._registered:
            broker = Component.STARTING
        else:
            broker = Component.UP
        if self._store_ok_at is None:
            store = Component.STARTING
        elif time.monotonic() - self._store_ok_at > 3 * _STATS_TICK:
            store = Component.DOWN
        else:
            store = Component.UP
        if self._registry is None:
            registry = Component.STARTING
        elif self._registry.connection_state in (None, "connected"):
            registry = Component.UP
        else:
            registry = Component.DEGRADED
        return HealthReport(broker=broker, store=store, registry=registry)

    @property
    def _pipeline(self) -> BrokerCore:
        if self._core is None:
            raise RuntimeError("broker not started")
        return self._core

    def _uptime(self) -> float:
        return time.monotonic() - self._started

    def _warn_unprotected(self) -> None:
        config = self.config
        if not config.admin_secret:
            # expected on a dev cluster; a production-shaped one asked for it explicitly
            dev = config.dev
            logger.log(
                logging.INFO if dev else logging.WARNING,
                "admin service and ops pages open: no admin secret (%s)",
                "dev cluster" if dev else "adminOpen = true",
            )
        if self.tls_mode is TlsMode.OFF and not is_loopback(self._bind_host) and not config.dev:
            logger.warning(
                "gRPC port %s is plaintext: group and admin secrets cross the network in "
                "cleartext (set tlsCert and tlsKey)",
                self.advertised,
            )

    async def _taken_over(self, taken: TakenOver) -> None:
        """Rows of a dead broker became ours: deliver them now, count them."""
        self._pipeline.dispatcher.stored_backlog.load(taken.pending)
        # the dead broker's keyed messages are in no lane here yet
        self._pipeline.dispatcher.lanes.hold()
        self._pipeline.recover.wake()
        self.metrics.taken_over(taken.rows)
        await self._pipeline.transactions.load()
        self._backlog = await self._store_or_fail().backlog()
        self.metrics.set_backlog(self._backlog)

    def _spawn(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a background loop under supervision: if it dies, the broker stops loudly."""
        task = asyncio.create_task(loop(), name=f"kiteq-{name}")
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if t.cancelled():
                return
            exc = t.exception()
            if exc is not None and self._failure is None:
                logger.critical(
                    "background loop %s crashed; stopping the broker", name, exc_info=exc
                )
                self._failure = exc
                self._stopping.set()

        task.add_done_callback(done)

    async def _stats_loop(self) -> None:
        while True:
            self._backlog = await self._store_or_fail().backlog()
            self.metrics.set_backlog(self._backlog)
            self._dead_letters = await self._store_or_fail().dlq_size()
            self.metrics.set_dead_letters(self._dead_letters)
            pipeline = self._pipeline
            # every served topic has a series (0: nothing scheduled), counted in memory
            scheduled = dict.fromkeys((t for t in pipeline.config.topics if t != ANY_TOPIC), 0)
            scheduled.update(pipeline.scheduled.counts(pipeline.clock.now()))
            self.metrics.set_scheduled(scheduled)
            self._store_ok_at = time.monotonic()
            self.metrics.set_inflight(self._pipeline.dispatcher.inflight)
            consumers = sum(1 for c in self._pipeline.connections if c.consumer)
            self.metrics.set_connections("consumer", consumers)
            self.metrics.set_connections("producer", len(self._pipeline.connections) - consumers)
            self._group_metrics()
            await asyncio.sleep(_STATS_TICK)

    def _group_metrics(self) -> None:
        """Per-(topic, group) gauges, transactions and ZooKeeper state, all from memory."""
        gauges = self._pipeline.dispatcher.group_gauges()
        per_group: dict[str, int] = {}
        for conn in self._pipeline.connections:
            if conn.consumer:
                per_group[conn.group] = per_group.get(conn.group, 0) + 1
        consumers = {
            (binding.topic, binding.group_id): per_group.get(binding.group_id, 0)
            for binding in self._pipeline.bindings.bindings()
        }
        self.metrics.set_groups(
            gauges.unacked, gauges.waiting, gauges.backlog, gauges.oldest, consumers
        )
        # every bound pair has a series (0: no busy ordering key)
        blocked, head_age = dict.fromkeys(consumers, 0), dict.fromkeys(consumers, 0.0)
        for key, lane in gauges.lanes.items():
            blocked[key], head_age[key] = lane.blocked, lane.oldest_head_age
        self.metrics.set_ordering(blocked, head_age)
        tx = self._pipeline.transactions
        self.metrics.set_transactions(tx.pending, tx.unresolved)
        for result, n in tx.check_results.items():
            self.metrics.tx_checked(result, n)
        tx.check_results.clear()
        registry = self._registry
        if registry is not None and registry.connection_state is not None:
            self.metrics.set_zookeeper(registry.connection_state, registry.session_losses)

    def _store_or_fail(self) -> MessageStore:
        if self._store is None:
            raise RuntimeError("broker not started")
        return self._store

    # -- run and stop --------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait(self) -> None:
        """Until a stop is requested or a background loop fails (then re-raises it)."""
        await self._stopping.wait()
        if self._failure is not None:
            raise self._failure

    @property
    def store_description(self) -> str:
        """The store URL without credentials."""
        return self._store.description if self._store is not None else ""

    @property
    def failed(self) -> bool:
        return self._failure is not None

    async def _drain(self, done: Coroutine[Any, Any, None], timeout: float) -> None:
        """Wait for *done* at most *timeout* seconds, saying every second what remains."""
        task = asyncio.ensure_future(done)
        deadline = time.monotonic() + timeout
        try:
            while not task.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    logger.warning(
                        "drain timed out after %.1fs: %d deliveries unacked, %d publishes "
                        "unfinished",
                        timeout,
                        self._pipeline.dispatcher.inflight,
                        self._pipeline.intake.active,
                    )
                    return
                await asyncio.wait({task}, timeout=min(left, _DRAIN_REPORT_PERIOD))
                if not task.done():
                    logger.info(
                        "draining: waiting for %d deliveries, %d publishes (%.0fs left)",
                        self._pipeline.dispatcher.inflight,
                        self._pipeline.intake.active,
                        max(0.0, deadline - time.monotonic()),
                    )
        finally:
            task.cancel()

    async def stop(self) -> None:
        grace = self._grace
        if self._registration is not None:
            # first, so that clients stop choosing this broker before it refuses them
            await self._registration.unregister()
        logger.info("stopping: refusing new publishes, draining")
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        core = self._core
        if core is not None:
            core.intake.stop_accepting()
            await self._drain(core.intake.drained(), grace)
            core.dispatcher.pause()
            await self._drain(core.dispatcher.settled(), min(grace, self.config.delivery_seconds))
        if self._server is not None:
            await self._server.stop(1.0)
        if self._ops is not None:
            await self._ops.stop()
        if self._http is not None:
            await self._http.stop()
        if self._webhooks is not None:
            # after the drain: calls still unanswered fail over and are checkpointed below
            await self._webhooks.stop()
        if core is not None:
            saved = core.dispatcher.checkpoint()
            if saved:
                logger.info("saved bookkeeping of %d messages still in memory", saved)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(core.flushed(), grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._takeover is not None:
            await self._takeover.stop()
        if self._registry is not None:
            await self._registry.stop()
        if self._store is not None:
            await self._store.close()
        logger.info("stopped")
