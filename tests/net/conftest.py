"""Fixtures of the tests that run zdlb's runtime in the test's own event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.net.proxy_harness import ProxyStarter


@pytest.fixture
async def proxies() -> AsyncIterator[ProxyStarter]:
    """Starts proxies for one test (``proxies.start(config)``) and stops them all after it."""
    async with ProxyStarter() as starter:
        yield starter
