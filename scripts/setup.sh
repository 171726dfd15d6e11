#!/usr/bin/env bash
# Installs what a fresh machine lacks: system packages and the Python venv for interop tests and
# benchmarks. Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: libhdf5-dev for the HDF5 reader (hdf5-metno finds it without configuration);
# openssl makes the certificates of the TLS tests; postgresql is the fleet tests' shared catalog
# (they start their own server in a temporary directory).
apt_packages=(libhdf5-dev pkg-config openssl postgresql)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Python venv, rebuilt only when the pinned requirements change.
venv=.venv
req=tests/python/requirements.txt
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: creating $venv from $req" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
    echo "$want" >"$stamp"
fi

# The Python package, installed as users install it (`pip install ./python`), again whenever its
# files change. Its dependencies are already pinned above, so nothing else moves.
pkg_stamp="$venv/.python-package.sha256"
pkg_want=$(find python -type f \( -name '*.py' -o -name '*.toml' -o -name '*.md' -o -name py.typed \) \
    -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
if [ "$(cat "$pkg_stamp" 2>/dev/null)" != "$pkg_want" ]; then
    echo "setup: installing the artiflight Python package from python/" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --force-reinstall ./python
    echo "$pkg_want" >"$pkg_stamp"
fi
