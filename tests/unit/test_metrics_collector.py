"""The Prometheus view: names, types, labels and values, parsed back from the exposition text.

Every scrape goes through ``generate_latest`` and prometheus-client's own parser, so what is
asserted is what Prometheus would read. Live ``Server`` objects are changed between scrapes to
prove the one-hot state gauges follow them.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from zdlb import __version__
from zdlb.balancer.pool import Backend
from zdlb.balancer.server import AdminState, Health, Server
from zdlb.census import Census
from zdlb.config.load import parse_config
from zdlb.config.model import PoolName
from zdlb.deploy import record
from zdlb.deploy.plan import Step, Target
from zdlb.deploy.record import DeployRecord
from zdlb.events import Timeline
from zdlb.health.probes import ProbeResult
from zdlb.health.scheduler import HealthChecker
from zdlb.metrics.collector import CheckRecord, new_registry, take_snapshot
from zdlb.stats import Stats, merge

DOCS = Path(__file__).parents[2] / "docs" / "metrics.md"
# (sample name, sorted label pairs) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Fleet:
    """Two backends, three servers, their stats and probe results, and a registry over them."""

    stats: Stats
    backends: dict[str, Backend]
    checks: dict[Server, ProbeResult]
    registry: CollectorRegistry
    deploy: DeployRecord | None = None

    def server(self, backend: str, name: str) -> Server:
        server = self.backends[backend].server(name)
        assert server is not None
        return server

    def last_result(self, server: Server) -> CheckRecord | None:
        return self.checks.get(server)

    def scrape(self) -> Samples:
        return samples(generate_latest(self.registry).decode())


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, tuple(sorted(labels.items())))


@pytest.fixture
def fleet() -> Fleet:
    data = {
        "listeners": {"web": {"bind": "127.0.0.1:0", "backend": "app"}},
        "backends": {
            "app": {
                "servers": [
                    {"name": "s1", "address": "127.0.0.1:9001"},
                    {"name": "s2", "address": "127.0.0.1:9002", "pool": "backup"},
                ]
            },
            "api": {"servers": [{"name": "a1", "address": "127.0.0.1:9003"}]},
        },
    }
    config = parse_config(data, "test_metrics_collector", Path("."))
    stats = Stats.from_config(config)
    backends = {b.name: Backend(b) for b in config.backends}
    servers = [server for backend in backends.values() for server in backend.servers]
    fleet = Fleet(stats, backends, {}, CollectorRegistry())
    # The status page's series too: a timeline, and a census of app's hosts; and the deploy's.
    census = {"app": Census(fleet.backends["app"].identities())}
    fleet.registry = new_registry(
        lambda: take_snapshot(stats, servers, fleet), Timeline(), census, lambda: fleet.deploy
    )
    return fleet


def family_types(text: str) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(text)}


EXPECTED_FAMILIES = {
    "zdlb_tls_certificate_expiry_seconds": "gauge",  # TLS listeners (issue 14)
    "zdlb_listener_connections_open": "gauge",
    "zdlb_listener_connections": "counter",
    "zdlb_listener_http_responses": "counter",
    "zdlb_listener_bytes_in": "counter",
    "zdlb_listener_bytes_out": "counter",
    "zdlb_listener_connections_limit": "gauge",
    "zdlb_listener_connections_limit_hits": "counter",
    "zdlb_connections_limit": "gauge",
    "zdlb_connections_limit_hits": "counter",
    "zdlb_backend_connect_errors": "counter",
    "zdlb_backend_retries": "counter",
    "zdlb_backend_redispatches": "counter",
    "zdlb_backend_sticky_repins": "counter",
    "zdlb_backend_response_time_seconds": "histogram",
    "zdlb_backend_queued_requests": "counter",
    "zdlb_backend_queue_timeouts": "counter",
    "zdlb_backend_queue_wait_seconds": "counter",
    "zdlb_backend_queue_length": "gauge",
    "zdlb_server_requests": "counter",
    "zdlb_server_http_responses": "counter",
    "zdlb_server_connect_errors": "counter",
    "zdlb_server_stray_responses": "counter",
    "zdlb_server_bytes_in": "counter",
    "zdlb_server_bytes_out": "counter",
    "zdlb_server_pool": "gauge",
    "zdlb_server_admin_state": "gauge",
    "zdlb_server_health_state": "gauge",
    "zdlb_server_weight": "gauge",
    "zdlb_server_inflight_requests": "gauge",
    "zdlb_server_maxconn": "gauge",
    "zdlb_server_queue_length": "gauge",
    "zdlb_server_connections_open": "gauge",
    "zdlb_server_check_passed": "gauge",
    "zdlb_server_check_duration_seconds": "gauge",
    "zdlb_control_commands": "counter",
    "zdlb_events": "counter",
    "zdlb_sticky_users": "gauge",
    "zdlb_build_info": "gauge",
}


def test_every_family_has_its_type(fleet: Fleet) -> None:
    assert family_types(generate_latest(fleet.registry).decode()) == EXPECTED_FAMILIES


def a_deploy_in_its_run_step() -> DeployRecord:
    hosts = [("s1", "s2")]
    now = 1_000_000.0
    deploy = record.begin(
        None, backend="app", to=Target.MAIN, hosts=hosts, token="ab", pid=9, uid=0, now=now
    )
    return record.host_step(deploy, "ab", "s1", Step.RUN, now + 2)


def test_deploy_metrics_follow_the_record(fleet: Fleet) -> None:
    assert not any(name.startswith("zdlb_deploy") for name, _ in fleet.scrape())  # no deploy
    fleet.deploy = a_deploy_in_its_run_step()
    scraped = fleet.scrape()
    # The record's lease ran out long ago (its clock is in 1970): it reads as interrupted.
    assert scraped[key("zdlb_deploy_in_progress", backend="app")] == 0
    assert scraped[key("zdlb_deploy_status", backend="app", status="interrupted")] == 1
    assert scraped[key("zdlb_deploy_status", backend="app", status="running")] == 0
    assert scraped[key("zdlb_deploy_hosts", backend="app", status="running")] == 1
    assert scraped[key("zdlb_deploy_step", backend="app", server="s1", step="run")] == 1
    assert scraped[key("zdlb_deploy_step", backend="app", server="s1", step="flip")] == 0
    since = key("zdlb_deploy_step_started_timestamp_seconds", backend="app", server="s1")
    assert scraped[since] == 1_000_002.0
    fleet.deploy = record.end(
        record.renew(fleet.deploy, "ab", fleet.deploy.started_at),
        "ab",
        record.DeployStatus.DONE,
        "",
        fleet.deploy.started_at + 1,
    )
    scraped = fleet.scrape()
    assert scraped[key("zdlb_deploy_status", backend="app", status="done")] == 1


def test_every_exported_name_is_documented_and_back(fleet: Fleet) -> None:
    fleet.deploy = a_deploy_in_its_run_step()
    documented = set(re.findall(r"^\| `(zdlb_[a-z_]+)` \|", DOCS.read_text("utf-8"), re.M))
    text = generate_latest(fleet.registry).decode()
    exported = set(re.findall(r"^# TYPE (\S+) ", text, re.M))  # counters with their _total
    assert exported == documented


def test_fresh_counters_are_zero_series(fleet: Fleet) -> None:
    scraped = fleet.scrape()
    assert scraped[key("zdlb_listener_connections_total", listener="web")] == 0
    for code in ("1xx", "2xx", "3xx", "4xx", "5xx", "other"):
        assert (
            scraped[key("zdlb_server_http_responses_total", backend="api", server="a1", code=code)]
            == 0
        )
    assert scraped[key("zdlb_control_commands_total", result="usage")] == 0


def test_listener_and_server_counters(fleet: Fleet) -> None:
    listener = fleet.stats.listeners["web"]
    listener.connections_open += 2
    listener.connections_total += 9
    for status in (200, 204, 404, 503, 0):
        listener.responses[status // 100] += 1
    listener.bytes_in += 123
    listener.bytes_out += 4567
    s1 = fleet.stats.server("app", "s1")
    s1.requests += 4
    s1.responses[2] += 3
    s1.connect_errors += 2
    s1.bytes_in += 100
    s1.bytes_out += 4000
    fleet.stats.server("app", "s2").connect_errors += 5
    fleet.stats.control.error += 1
    scraped = fleet.scrape()
    web = {"listener": "web"}
    assert scraped[key("zdlb_listener_connections_open", **web)] == 2
    assert scraped[key("zdlb_listener_connections_total", **web)] == 9
    by_code = {
        c: scraped[key("zdlb_listener_http_responses_total", code=c, **web)]
        for c in ("1xx", "2xx", "3xx", "4xx", "5xx", "other")
    }
    assert by_code == {"1xx": 0, "2xx": 2, "3xx": 0, "4xx": 1, "5xx": 1, "other": 1}
    assert scraped[key("zdlb_listener_bytes_in_total", **web)] == 123
    assert scraped[key("zdlb_listener_bytes_out_total", **web)] == 4567
    app_s1 = {"backend": "app", "server": "s1"}
    assert scraped[key("zdlb_server_requests_total", **app_s1)] == 4
    assert scraped[key("zdlb_server_http_responses_total", code="2xx", **app_s1)] == 3
    assert scraped[key("zdlb_server_connect_errors_total", **app_s1)] == 2
    assert scraped[key("zdlb_server_bytes_in_total", **app_s1)] == 100
    assert scraped[key("zdlb_server_bytes_out_total", **app_s1)] == 4000
    # The backend's connect errors are its servers', summed at scrape time.
    assert scraped[key("zdlb_backend_connect_errors_total", backend="app")] == 7
    assert scraped[key("zdlb_backend_connect_errors_total", backend="api")] == 0
    assert scraped[key("zdlb_control_commands_total", result="error")] == 1


def test_backend_counters_and_histogram(fleet: Fleet) -> None:
    app = fleet.stats.backends["app"]
    app.retries += 1
    app.redispatches += 2
    app.sticky_repins += 3
    for seconds in (0.0005, 0.001, 0.003, 0.3, 20.0):
        app.observe_response_s(seconds)
    scraped = fleet.scrape()
    assert scraped[key("zdlb_backend_retries_total", backend="app")] == 1
    assert scraped[key("zdlb_backend_redispatches_total", backend="app")] == 2
    assert scraped[key("zdlb_backend_sticky_repins_total", backend="app")] == 3
    buckets = {
        labels[1][1]: value
        for (name, labels), value in scraped.items()
        if name == "zdlb_backend_response_time_seconds_bucket" and labels[0] == ("backend", "app")
    }
    assert buckets["0.001"] == 2  # le: 1 ms itself is in the 1 ms bucket
    assert buckets["0.0025"] == 2
    assert buckets["0.005"] == 3
    assert buckets["0.25"] == 3
    assert buckets["0.5"] == 4
    assert buckets["10.0"] == 4
    assert buckets["+Inf"] == 5
    assert list(buckets.values()) == sorted(buckets.values())  # cumulative
    hist = "zdlb_backend_response_time_seconds"
    assert scraped[key(f"{hist}_count", backend="app")] == 5
    assert scraped[key(f"{hist}_sum", backend="app")] == pytest.approx(20.3045)
    assert scraped[key(f"{hist}_count", backend="api")] == 0


def one_hot(scraped: Samples, name: str, backend: str, server: str) -> dict[str, float]:
    return {
        dict(labels)["state"]: value
        for (sample, labels), value in scraped.items()
        if sample == name and ("backend", backend) in labels and ("server", server) in labels
    }


def test_state_gauges_follow_the_live_servers(fleet: Fleet) -> None:
    s1 = fleet.server("app", "s1")
    scraped = fleet.scrape()
    assert one_hot(scraped, "zdlb_server_admin_state", "app", "s1") == {
        "ready": 1,
        "drain": 0,
        "maint": 0,
    }
    assert one_hot(scraped, "zdlb_server_health_state", "app", "s1") == {"up": 1, "down": 0}
    assert one_hot(scraped, "zdlb_server_pool", "app", "s2") == {"main": 0, "backup": 1}

    s1.set_admin(AdminState.DRAIN)
    s1.set_health(Health.DOWN)
    s1.pool = PoolName.BACKUP
    s1.weight = 7
    s1.inflight, s1.conns = 3, 5
    scraped = fleet.scrape()
    assert one_hot(scraped, "zdlb_server_admin_state", "app", "s1") == {
        "ready": 0,
        "drain": 1,
        "maint": 0,
    }
    assert one_hot(scraped, "zdlb_server_health_state", "app", "s1") == {"up": 0, "down": 1}
    assert one_hot(scraped, "zdlb_server_pool", "app", "s1") == {"main": 0, "backup": 1}
    app_s1 = {"backend": "app", "server": "s1"}
    assert scraped[key("zdlb_server_weight", **app_s1)] == 7
    assert scraped[key("zdlb_server_inflight_requests", **app_s1)] == 3
    assert scraped[key("zdlb_server_connections_open", **app_s1)] == 5
    # The other servers did not move.
    assert one_hot(scraped, "zdlb_server_admin_state", "api", "a1")["ready"] == 1

    s1.set_admin(AdminState.MAINT)
    assert one_hot(fleet.scrape(), "zdlb_server_admin_state", "app", "s1") == {
        "ready": 0,
        "drain": 0,
        "maint": 1,
    }


def test_check_results_only_for_probed_servers(fleet: Fleet) -> None:
    s1, s2 = fleet.server("app", "s1"), fleet.server("app", "s2")
    fleet.checks[s1] = ProbeResult(True, "ok 200", 0.012)
    fleet.checks[s2] = ProbeResult(False, "connect refused", 0.0004)
    scraped = fleet.scrape()
    assert scraped[key("zdlb_server_check_passed", backend="app", server="s1")] == 1
    assert scraped[key("zdlb_server_check_duration_seconds", backend="app", server="s1")] == 0.012
    assert scraped[key("zdlb_server_check_passed", backend="app", server="s2")] == 0
    assert key("zdlb_server_check_passed", backend="api", server="a1") not in scraped
    assert key("zdlb_server_check_duration_seconds", backend="api", server="a1") not in scraped


def test_health_checker_is_a_check_source(fleet: Fleet) -> None:
    servers = [s for backend in fleet.backends.values() for s in backend.servers]
    registry = new_registry(lambda: take_snapshot(fleet.stats, servers, HealthChecker(servers)))
    scraped = samples(generate_latest(registry).decode())
    assert key("zdlb_server_weight", backend="app", server="s1") in scraped
    assert not any(name == "zdlb_server_check_passed" for name, _ in scraped)  # not probed


def test_build_info() -> None:
    scraped = samples(generate_latest(new_registry(Stats().snapshot)).decode())
    labels = {"version": __version__, "python": platform.python_version()}
    assert scraped[key("zdlb_build_info", **labels)] == 1


def test_merged_snapshots_render_like_live_ones(fleet: Fleet) -> None:
    fleet.stats.listeners["web"].responses[2] += 5
    fleet.stats.backends["app"].observe_response_s(0.02)
    fleet.server("app", "s1").inflight = 2
    servers = [s for backend in fleet.backends.values() for s in backend.servers]
    worker = take_snapshot(fleet.stats, servers, fleet)
    census = {"app": Census(fleet.backends["app"].identities())}
    registry = new_registry(lambda: merge([worker, worker, worker]), Timeline(), census)
    scraped = samples(generate_latest(registry).decode())
    assert scraped[key("zdlb_listener_http_responses_total", listener="web", code="2xx")] == 15
    assert scraped[key("zdlb_backend_response_time_seconds_count", backend="app")] == 3
    assert scraped[key("zdlb_server_inflight_requests", backend="app", server="s1")] == 6
    assert one_hot(scraped, "zdlb_server_admin_state", "app", "s1")["ready"] == 1
    assert set(family_types(generate_latest(registry).decode())) == set(EXPECTED_FAMILIES)


def test_openmetrics_output(fleet: Fleet) -> None:
    fleet.stats.backends["app"].observe_response_s(0.02)
    encoder, content_type = choose_encoder("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    text = encoder(fleet.registry).decode()
    assert text.endswith("# EOF\n")
    assert "# TYPE zdlb_build info\n" in text
    assert "# TYPE zdlb_backend_response_time_seconds histogram\n" in text
    assert 'zdlb_server_admin_state{backend="app",server="s1",state="ready"} 1.0\n' in text


def test_registries_are_dedicated(fleet: Fleet) -> None:
    second = new_registry(Stats().snapshot)  # a second runtime's registry: no clash
    assert b"zdlb_build_info" in generate_latest(second)
    assert b"zdlb_" not in generate_latest(REGISTRY)


def test_source_errors_propagate() -> None:
    def broken() -> Stats:
        raise RuntimeError("source broke")

    registry = new_registry(lambda: broken().snapshot())
    with pytest.raises(RuntimeError, match="source broke"):
        generate_latest(registry)
