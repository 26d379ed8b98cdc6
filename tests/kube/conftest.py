"""Fixtures for tests against the fake API server: the server and real clients for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes import client

from trio_cloudhub.testing.fake_kube import FakeKube, open_fake_kube

# Short, so tests see bookmarks without waiting long.
BOOKMARK_INTERVAL = 0.2


@pytest.fixture
async def fake_kube() -> AsyncIterator[FakeKube]:
    async with open_fake_kube(bookmark_interval=BOOKMARK_INTERVAL) as kube:
        yield kube


# Async like `fake_kube`: pytest-trio resolves trio fixtures only for other trio fixtures.
@pytest.fixture
async def kube_api(fake_kube: FakeKube) -> AsyncIterator[Any]:
    api = fake_kube.api_client()
    yield api
    api.close()


@pytest.fixture
async def core_v1(kube_api: Any) -> Any:
    return client.CoreV1Api(kube_api)


@pytest.fixture
async def custom_objects(kube_api: Any) -> Any:
    return client.CustomObjectsApi(kube_api)
