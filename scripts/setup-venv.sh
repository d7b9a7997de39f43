#!/usr/bin/env bash
# Create ./.venv (once) and install hpc_elastic into it with its dev, plot and hangs extras
# (hangs = py-spy: the hang tests and benchmark dump a frozen rank's stack with it; the
# faulthandler fallback cannot answer for a stopped process).
#
# torch is installed first and pinned to 2.13.0: with it in place, the package's own
# "torch>=2.4" range is satisfied and pip pulls nothing more. An unpinned torch would
# download several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    echo "setup: python3-venv is missing; installing it with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"

stamp="$VENV/.hpc_elastic-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup-venv.sh -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" numpy
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev,plot,hangs]'
    touch "$stamp"
fi
