"""The `duskpool` command: help, answers on stdout, one-line errors with exit code 2."""

import subprocess
import sys

import pytest

from duskpool.backends import backend
from duskpool.cli.main import main
from tests.conftest import Q, write_tiny_llama


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_explains_the_commands(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "run" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--model", "--max-tokens", "--temperature", "--seed", "--threads"):
        assert flag in help_text


def test_run_streams_the_answer_to_stdout_and_diagnostics_to_stderr(capsys):
    code, out, err = run_cli(capsys, "run", "--max-tokens", "20", "--threads", "2",
                             "What is the capital of France?")
    assert code == 0 and "Paris" in out
    assert "tok/s" in err and "tok/s" not in out


@pytest.mark.parametrize("case", ["missing", "not-gguf", "truncated", "architecture", "bad-flag"])
def test_bad_input_is_one_line_on_stderr_and_exit_2(capsys, tmp_path, case):
    model = tmp_path / "model.gguf"
    if case == "not-gguf":
        model.write_text("hello, I am a text file\n")
    elif case in ("truncated", "architecture"):
        write_tiny_llama(model, Q.Q8_0, architecture="llama" if case == "truncated" else "rwkv6")
        if case == "truncated":
            model.write_bytes(model.read_bytes()[:5000])
    args = ["run", "--model", str(model), "hi"] + (["--temperature", "-1"] if case == "bad-flag" else [])
    code, out, err = run_cli(capsys, *args)
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and out == ""
    assert len(errors) == 1 and errors[0].startswith("duskpool: error:") and "Traceback" not in err
    expected = {"missing": "not found", "not-gguf": "not a GGUF", "truncated": "truncated",
                "architecture": "architecture 'rwkv6'", "bad-flag": "temperature"}[case]
    assert expected in errors[0]


@pytest.mark.slow
def test_the_installed_command_answers(tmp_path):
    done = subprocess.run([sys.executable, "-m", "duskpool.cli.main", "run", "--max-tokens", "8", "Say hi"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr


@pytest.mark.slow
def test_swarm_answers_a_prompt_and_prints_the_placement(tmp_path):
    done = subprocess.run([sys.executable, "-m", "duskpool.cli.main", "swarm", "--nodes", "2", "--max-tokens", "8",
                           "What is the capital of France?"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "placement: gateway [0, 2) -> 127.0.0.1:" in done.stderr  # the audited default prefix
    assert "privacy: nodes see the hidden states after layer 2; at --privacy-prefix 2" in done.stderr


@pytest.mark.slow
def test_plan_explains_the_placement(capsys, tmp_path):
    from duskpool.cluster.swarm import LocalSwarm

    with LocalSwarm(2, cache_root=tmp_path) as swarm:
        code, out, _ = run_cli(capsys, "plan", "--node", swarm.addresses[0], "--node", swarm.addresses[1],
                               "--state-dir", str(swarm.pool.pool.state_dir))
    assert code == 0
    assert "ms/token" in out and "gateway" in out
    assert f"cpu ({backend('cpu').device()})" in out  # each node's backend and device, as its Info says
