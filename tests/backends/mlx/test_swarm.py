"""MLX and CPU nodes serve one route: two MLX nodes and a CPU node behind a CPU gateway give the single-process
greedy tokens."""

import pytest

pytest.importorskip("mlx.core")

from duskpool.cluster.gateway import Gateway  # noqa: E402
from duskpool.cluster.node import NodeService  # noqa: E402
from duskpool.cluster.transport import start_server  # noqa: E402
from duskpool.engine.runner import LocalEngine  # noqa: E402
from tests.conftest import greedy_tokens


@pytest.mark.slow
def test_mlx_and_cpu_nodes_share_a_route(bundled_model, tmp_path):
    whole = LocalEngine.load(bundled_model)
    prompt = whole.tokenizer.encode(whole.tokenizer.render_chat([{"role": "user", "content": "Name a colour."}]))
    expected = greedy_tokens(whole, prompt, 16)

    nodes = [NodeService(tmp_path / f"node-{i}", backend_name=name) for i, name in enumerate(["mlx", "cpu", "mlx"])]
    servers = [start_server(node, "127.0.0.1", 0, None, lambda fingerprint: False) for node in nodes]
    gateway = Gateway.start(bundled_model, [f"127.0.0.1:{port}" for _, port in servers], identity=None,
                            even_split=True, progress=False)
    try:
        assert len(gateway.route) == 3
        assert greedy_tokens(gateway, prompt, 16) == expected
        assert [(node.backend.NAME, len(node.spans)) for node in nodes] == [("mlx", 1), ("cpu", 1), ("mlx", 1)]
    finally:
        gateway.close()
        for (server, _), node in zip(servers, nodes, strict=True):
            server.stop(grace=0)
            node.close()
