"""A real HTTP server for tests that need one (SSE clients, tritonclient, bursts of requests),
and the fixtures serving the test's stack (a plugin of tests/conftest.py)."""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import tritonclient.http as triton
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tritonclient._plugin import InferenceServerClientPlugin

from app.config import get_settings


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """``app`` served by uvicorn in a thread on a free port; yields ``host:port``."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture
def url(client: TestClient) -> Iterator[str]:
    """The API served over HTTP on the test's stack (``client`` empties the tables after)."""
    from app.main import create_app

    with serving(create_app()) as address:
        yield f"http://{address}"


@pytest.fixture
def keyed_url(client: TestClient) -> Iterator[str]:
    """``url`` with API keys required (``DISTILL_AUTH=required``), on either stack; a key is
    read again at every request (``DISTILL_AUTH_CACHE_S=0``), so a revocation shows at once."""
    from app.main import create_app

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILL_AUTH", "required")
        mp.setenv("DISTILL_AUTH_CACHE_S", "0")
        get_settings.cache_clear()
        with serving(create_app()) as address:
            yield f"http://{address}"
    get_settings.cache_clear()


class BearerAuth(InferenceServerClientPlugin):
    """Sends an API key with every request of Triton's client (its plugin interface)."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    def __call__(self, request: Any) -> None:
        request.headers.update(self.headers)


def v2_client(
    address: str, headers: dict[str, str], **options: Any
) -> triton.InferenceServerClient:
    """Triton's HTTP client of the Open Inference Protocol at ``address``, sending ``headers``."""
    client = triton.InferenceServerClient(address, **options)
    client.register_plugin(BearerAuth(headers))
    return client
