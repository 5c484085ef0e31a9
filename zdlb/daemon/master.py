"""The master process of a ``workers = N`` daemon: what lifecycle.serve is for one process --
the control socket, /metrics, the workers (workers.py ``Supervisor``), reload and upgrade, the
health checks -- until ``stop``, then the drain (workers.py has the rules).
"""

from __future__ import annotations

import asyncio
import logging

from zdlb.daemon import notify
from zdlb.daemon.lifecycle import (
    ActionsFactory,
    announce_ready,
    install_actions,
    log_listener_started,
    start_control,
    start_metrics,
)
from zdlb.daemon.reload import Reloader, Role
from zdlb.daemon.runtime import Runtime
from zdlb.daemon.worker import WorkerOptions
from zdlb.daemon.workers import Supervisor

log = logging.getLogger(__name__)


async def serve_master(
    runtime: Runtime,
    stop: asyncio.Event,
    count: int,
    options: WorkerOptions,
    actions: ActionsFactory | None = None,
) -> None:
    """lifecycle.serve for ``count`` > 1 workers: the rules above, until ``stop`` is set."""
    supervisor = Supervisor(runtime, count, options)
    control = await start_control(runtime, supervisor)
    metrics = await start_metrics(runtime, supervisor.snapshot, supervisor, control)
    try:
        await supervisor.start()
    except BaseException:
        await supervisor.stop(0.0)
        raise
    reloader = Reloader(runtime, control.controller if control else None, Role.MASTER)
    reloader.push = supervisor.push_config
    reloader.workers = supervisor  # a reload may change `workers` (resize.py)
    runtime.collect_idle = supervisor.collect_idle  # an upgrade from here (upgrade.py)
    runtime.deliver_connections = supervisor.dealer.deliver  # an upgrade to here
    if actions is not None:
        reloader.upgrade_action = actions(runtime, control, stop).upgrade
    install_actions(reloader, control)
    for route, sock in runtime.sockets:
        log_listener_started(route.listener, sock, route.backend)
    for tcp_route, sock in runtime.tcp_sockets:
        log_listener_started(tcp_route.listener, sock, tcp_route.backend)
    log.info("workers_started workers=%d", count)
    runtime.start_health()
    announce_ready(runtime)
    async with asyncio.TaskGroup() as tasks:
        supervising = tasks.create_task(supervisor.run())
        await stop.wait()
        if not runtime.handed_over:
            notify.stopping()
        if control is not None:
            await control.close(unlink=not runtime.handed_over)
        grace_s = max((route.timeouts.grace_s for route in runtime.all_routes), default=0.0)
        await supervisor.stop(grace_s)
        supervising.cancel()
        await runtime.stop_health()
    if metrics is not None:
        metrics.close()
        await metrics.wait_closed()
    log.info("shutdown_finished workers=%d", count)
