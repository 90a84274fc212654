"""init / token / node --join / nodes / nodes revoke, as a user runs them, over real sockets; serve's bind rule;
models on fixture homes."""

import re
import socket
import subprocess
import sys

import grpc
import pytest

from duskpool.cluster.proto import duskpool_pb2 as pb
from duskpool.cluster.proto import duskpool_pb2_grpc as pb_grpc
from duskpool.cluster.transport import open_channel
from duskpool.security import PoolState, load_identity, start_join_server
from tests.cli.test_main import run_cli


def start_node(args: list[str]) -> tuple[subprocess.Popen, str]:
    node = subprocess.Popen([sys.executable, "-m", "duskpool.cli.main", "node", "--host", "127.0.0.1", "--port", "0",
                             "--no-announce", "--threads", "1", "--lend", "always", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = node.stdout.readline()
    match = re.search(r"listening on (\S+)", line)
    if match is None:
        node.kill()
        raise AssertionError(f"node did not start: {line!r} {node.stderr.read()}")
    return node, match.group(1)


def test_a_node_joins_with_a_token_and_is_revoked(capsys, tmp_path):
    state = str(tmp_path / "pool")
    code, out, _ = run_cli(capsys, "init", "--state-dir", state)
    assert code == 0 and re.search(r"CA fingerprint \(sha256\): [0-9a-f]{64}", out)
    code, _, err = run_cli(capsys, "init", "--state-dir", state)
    assert code == 2 and "already exists" in err

    code, token, _ = run_cli(capsys, "token", "--state-dir", state, "--ttl", "5m")
    token = token.strip()
    assert code == 0 and token.startswith("dp1.")
    pool = PoolState(tmp_path / "pool")
    join_server, port = start_join_server(pool, "127.0.0.1", 0)
    node = None
    try:
        node, address = start_node(["--join", f"{token}@127.0.0.1:{port}", "--identity", str(tmp_path / "node")])
        identity = load_identity(tmp_path / "node")
        gateway = pool.gateway_identity()
        with open_channel(address, gateway) as channel:  # the gateway, over mutual TLS
            assert pb_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=10).version
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError):  # plaintext: refused
            pb_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=3)

        code, out, _ = run_cli(capsys, "nodes", "--state-dir", state)
        assert code == 0 and re.search(rf"^{identity.member_id}\s+\S+\s+node\s+127\.0\.0\.1\s.*member$", out, re.M)

        # the same token again: refused with the reason, exit 2
        second = subprocess.run([sys.executable, "-m", "duskpool.cli.main", "node", "--port", "0", "--no-announce",
                                 "--join", f"{token}@127.0.0.1:{port}", "--identity", str(tmp_path / "node2")],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "used" in second.stderr, second.stderr

        # a peer with the node's certificate, once revoked (the gateway pushes the list), is refused
        peer = pool.issue_identity("peer", "127.0.0.1")
        with open_channel(address, peer) as channel:
            assert pb_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=10).version
        code, out, _ = run_cli(capsys, "nodes", "revoke", str(peer.member_id), "--state-dir", state)
        assert code == 0 and "revoked" in out
        with open_channel(address, gateway) as channel:
            pb_grpc.NodeStub(channel).SetRevoked(pb.RevokedList(fingerprints=sorted(pool.revoked_fingerprints())),
                                                 timeout=10)
        with open_channel(address, peer) as channel, pytest.raises(grpc.RpcError) as refused:
            pb_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with open_channel(address, identity) as channel, pytest.raises(grpc.RpcError) as refused:
            pb_grpc.NodeStub(channel).SetRevoked(pb.RevokedList(), timeout=10)  # only the gateway may
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        code, out, _ = run_cli(capsys, "nodes", "--state-dir", state)
        assert re.search(rf"^{peer.member_id}\s+peer\s.*revoked$", out, re.M)
    finally:
        if node is not None:
            node.terminate()
            node.wait(10)
        join_server.stop(grace=0)


def test_a_node_started_before_its_gateway_waits_for_the_join_server(capsys, tmp_path):
    state = str(tmp_path / "pool")
    assert run_cli(capsys, "init", "--state-dir", state)[0] == 0
    _, token, _ = run_cli(capsys, "token", "--state-dir", state)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # nothing listens there until the join server below
    node = subprocess.Popen([sys.executable, "-m", "duskpool.cli.main", "node", "--host", "127.0.0.1", "--port", "0",
                             "--no-announce", "--threads", "1", "--lend", "always", "--join",
                             f"{token.strip()}@127.0.0.1:{port}", "--identity", str(tmp_path / "node")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    join_server = None
    try:
        waiting = next((line for line in node.stderr if "waiting for the gateway's join server" in line), None)
        assert waiting is not None, f"the node exited with code {node.wait()} instead of waiting"
        join_server, _ = start_join_server(PoolState(tmp_path / "pool"), "127.0.0.1", port)
        assert "listening on" in node.stdout.readline()
        assert load_identity(tmp_path / "node").member_id
    finally:
        node.terminate()
        node.wait(10)
        if join_server is not None:
            join_server.stop(grace=0)


@pytest.mark.parametrize("holder", ["a node", "another program"])
def test_a_node_whose_port_is_taken_says_so_and_exits_2(tmp_path, holder):
    first, taken = None, socket.socket()
    try:
        if holder == "a node":
            first, address = start_node(["--insecure", "--cache-dir", str(tmp_path / "first")])
            port = int(address.rpartition(":")[2])
        else:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
        second = subprocess.run([sys.executable, "-m", "duskpool.cli.main", "node", "--host", "127.0.0.1", "--port",
                                 str(port), "--no-announce", "--insecure", "--lend", "always", "--cache-dir",
                                 str(tmp_path / "second")], capture_output=True, text=True, timeout=120)
    finally:
        taken.close()
        if first is not None:
            first.terminate()
            first.wait(10)
    errors = [line for line in second.stderr.splitlines() if line.startswith("duskpool: error:")]
    assert second.returncode == 2 and "listening on" not in second.stdout, second.stderr
    assert len(errors) == 1 and f"cannot listen on 127.0.0.1:{port}" in errors[0] and "Traceback" not in second.stderr


def test_a_node_without_an_identity_says_how_to_join(capsys, tmp_path):
    code, _, err = run_cli(capsys, "node", "--port", "0", "--no-announce", "--identity", str(tmp_path / "none"))
    assert code == 2 and "--join" in err and "duskpool token" in err


def test_token_without_a_pool_says_to_init(capsys, tmp_path):
    code, _, err = run_cli(capsys, "token", "--state-dir", str(tmp_path / "nothing"))
    assert code == 2 and "duskpool init" in err


def test_serving_off_loopback_needs_an_api_key(tmp_path):
    env = {"DUSKPOOL_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "duskpool.cli.main", "serve", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "API key" in done.stderr and "duskpool key create" not in done.stdout


def test_models_lists_what_ollama_lm_studio_and_hf_keep(capsys, tmp_path, monkeypatch):
    gguf = b"GGUF" + bytes(60)
    blob = tmp_path / ".ollama/models/blobs" / ("sha256-" + "ab" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(gguf)
    manifest = tmp_path / ".ollama/models/manifests/registry.ollama.ai/library/llama3.2/3b"
    manifest.parent.mkdir(parents=True)
    manifest.write_text('{"layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:'
                        + "ab" * 32 + '"}]}')
    lms = tmp_path / ".lmstudio/models/lmstudio-community/Qwen3-4B-GGUF/Qwen3-4B-Q4_K_M.gguf"
    lms.parent.mkdir(parents=True)
    lms.write_bytes(gguf)
    hf = tmp_path / ".cache/huggingface/hub/models--bartowski--Llama-3.2-1B-Instruct-GGUF/snapshots/abc"
    hf.mkdir(parents=True)
    (hf / "Llama-3.2-1B-Instruct-Q8_0.gguf").write_bytes(gguf)
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("OLLAMA_MODELS", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", "LMSTUDIO_MODELS"):
        monkeypatch.delenv(var, raising=False)
    code, out, _ = run_cli(capsys, "models")
    names = [line.split()[0] for line in out.splitlines()[1:]]
    assert code == 0 and names[:3] == ["llama3.2:3b", "lmstudio-community/Qwen3-4B-GGUF/Qwen3-4B-Q4_K_M.gguf",
                                       "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q8_0"]
    code, _, err = run_cli(capsys, "run", "--model", "llama3.2:3", "hi")
    assert code == 2 and "llama3.2:3b" in err  # the close name is suggested


def test_service_install_writes_a_unit_that_runs_the_node_with_its_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    code, out, _ = run_cli(capsys, "service", "install", "--dry-run", "--", "--lend", "always", "--require-ac")
    assert code == 0 and all(arg in out for arg in ("duskpool.cli.main", "node", "--lend", "always", "--require-ac"))
    with pytest.raises(SystemExit):  # a node flag that does not exist fails now, not in the service's log
        run_cli(capsys, "service", "install", "--dry-run", "--", "--no-such-flag")


def test_key_create_makes_a_key_the_api_accepts(capsys, tmp_path, monkeypatch):
    from duskpool.cli.parser import build_parser
    from duskpool.cli.serving import key_check

    monkeypatch.delenv("DUSKPOOL_API_KEY", raising=False)
    state = str(tmp_path / "pool")
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--state-dir", state])
    assert key_check(args) is None  # no keys yet: serving off loopback would be refused
    code, key, _ = run_cli(capsys, "key", "create", "--state-dir", state)
    key = key.strip()
    assert code == 0 and key.startswith("dpk_") and key not in (tmp_path / "pool" / "pool.db").read_bytes().decode(
        "latin-1")
    check = key_check(args)
    assert check(key) and not check(key + "x") and not check("")
    monkeypatch.setenv("DUSKPOOL_API_KEY", "given")
    both = key_check(build_parser().parse_args(["serve", "--state-dir", state]))
    assert both("given") and both(key) and not both("neither")


def test_an_api_key_from_a_file_is_accepted_and_one_on_the_command_line_refused(capsys, tmp_path, monkeypatch):
    from duskpool.cli.parser import build_parser
    from duskpool.cli.serving import key_check

    monkeypatch.delenv("DUSKPOOL_API_KEY", raising=False)
    state = str(tmp_path / "pool")
    keys = tmp_path / "keys"
    keys.write_text("dpk_from_file\n\n  dpk_second  \n")
    check = key_check(build_parser().parse_args(["serve", "--api-key-file", str(keys), "--state-dir", state]))
    assert check("dpk_from_file") and check("dpk_second") and not check("") and not check("dpk_other")
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # every user of the machine could read it in `ps`
        build_parser().parse_args(["serve", "--api-key", "dpk_argv", "--state-dir", state])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "--api-key is refused" in err
    assert "--api-key-file PATH" in err and "DUSKPOOL_API_KEY" in err and "dpk_argv" not in err
