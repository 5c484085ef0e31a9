"""Health checks: pure rise/fall verdicts (verdict.py), probes (probes.py), scheduling
(scheduler.py).

The checker sets ``Server.health``; the balancer only reads it. Nothing here picks a server or
touches a client connection.
"""

from zdlb.health.probes import ProbeResult, probe_target, run_probe
from zdlb.health.scheduler import HealthChecker
from zdlb.health.verdict import Transition, Verdict

__all__ = ["HealthChecker", "ProbeResult", "Transition", "Verdict", "probe_target", "run_probe"]
