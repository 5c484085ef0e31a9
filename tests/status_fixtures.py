"""A demo-like configuration built in memory, with everything a ``StatusBoard`` reads.

Two hosts (front-1, front-2), each a main and a paired backup, a sticky cookie; the objects are
the daemon's own (``Backend``, ``HealthChecker``, ``Stats``, ``Timeline``, ``Census``), nothing
stubbed. Used by the status board's unit tests and the endpoint's net tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zdlb.balancer.pool import Backend
from zdlb.balancer.server import Server
from zdlb.census import Census
from zdlb.config.load import parse_config
from zdlb.config.model import Config
from zdlb.events import Timeline
from zdlb.health.scheduler import HealthChecker
from zdlb.metrics.collector import take_snapshot
from zdlb.stats import Snapshot, Stats

DEMO = {
    "listeners": {"web": {"bind": "127.0.0.1:0", "backend": "app"}},
    "backends": {
        "app": {
            "sticky": {"cookie": "SERVERID"},
            "servers": [
                {"name": "front-1", "address": "127.0.0.1:8081"},
                {"name": "front-2", "address": "127.0.0.1:8082"},
                {
                    "name": "front-1-backup",
                    "address": "127.0.0.1:8091",
                    "pool": "backup",
                    "pair": "front-1",
                },
                {
                    "name": "front-2-backup",
                    "address": "127.0.0.1:8092",
                    "pool": "backup",
                    "pair": "front-2",
                },
                {"name": "spare", "address": "127.0.0.1:8099", "pool": "backup"},
            ],
        }
    },
}


@dataclass
class DemoState:
    config: Config
    backends: dict[str, Backend]
    health: HealthChecker
    stats: Stats
    events: Timeline
    census: dict[str, Census]

    @property
    def servers(self) -> list[Server]:
        return [s for backend in self.backends.values() for s in backend.servers]

    def server(self, name: str) -> Server:
        found = self.backends["app"].server(name)
        assert found is not None
        return found

    def snapshot(self) -> Snapshot:
        return take_snapshot(self.stats, self.servers, self.health)


def demo_state() -> DemoState:
    config = parse_config(DEMO, "demo.toml", Path("/etc/zdlb"))
    backends = {b.name: Backend(b) for b in config.backends}
    events = Timeline()
    servers = [s for backend in backends.values() for s in backend.servers]
    health = HealthChecker(servers, events=events)
    census = {"app": Census(backends["app"].identities(), key=7)}
    return DemoState(config, backends, health, Stats.from_config(config), events, census)
