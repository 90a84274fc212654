"""A live HTTP server (real uvicorn, real sockets) on a 3-node local swarm, shared by the API tests."""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn

from duskpool.api.server import create_app
from duskpool.api.service import Service
from duskpool.cluster.gateway import Gateway
from duskpool.cluster.swarm import LocalSwarm
from duskpool.weights.catalog import BUNDLED_NAME


@contextmanager
def live_server(service: Service, **app_kw) -> Iterator[str]:
    """Serve `service` on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(create_app(service, **app_kw), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="package")
def swarm(tmp_path_factory):
    with LocalSwarm(3, cache_root=tmp_path_factory.mktemp("swarm")) as swarm:
        yield swarm


@pytest.fixture(scope="package")
def gateway(swarm, bundled_model):
    gateway = Gateway.start(bundled_model, swarm.addresses, identity=swarm.gateway_identity, even_split=True,
                            progress=False)
    yield gateway
    gateway.close()


@pytest.fixture(scope="package")
def service(gateway, bundled_model):
    service = Service(gateway, BUNDLED_NAME, bundled_model)
    yield service
    service.close()


@pytest.fixture(scope="package")
def base_url(service):
    with live_server(service) as url:
        yield url
