#!/usr/bin/env bash
# The test command: installs what the tests need (when run as root on Debian/Ubuntu), then
# checks formatting and lints and runs every test. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v mosquitto >/dev/null || need_pkgs+=(mosquitto)
command -v mosquitto_sub >/dev/null || need_pkgs+=(mosquitto-clients)
command -v openssl >/dev/null || need_pkgs+=(openssl)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -q -o DPkg::Lock::Timeout=600 update
    apt-get -q -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${need_pkgs[@]}"
  else
    echo "missing: ${need_pkgs[*]}: run 'sudo apt-get install -y ${need_pkgs[*]}' (or run this script as root)" >&2
    exit 1
  fi
fi
# The Debian package may start its own broker on 1883; the tests use their own ports.

# cantools is the reference the CAN decoder is checked against.
if ! python3 -c 'import cantools' 2>/dev/null; then
  python3 -m pip install --quiet cantools==45.1.0 ||
    python3 -m pip install --quiet --break-system-packages cantools==45.1.0
fi

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --all-targets
