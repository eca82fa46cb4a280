"""Several processes (ledgers with their own owner ids and store connections) on one database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support_leases import Cluster, cluster


@pytest.fixture(params=["sqlite", "postgres"])
async def shared(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(request.param, tmp_path) as c:
        yield c
