#!/usr/bin/env bash
# The test command: installs what the tests need (when run as root on Debian/Ubuntu), then
# checks formatting and lints and runs every test (with the `test-hooks` feature).
# Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v mosquitto >/dev/null || need_pkgs+=(mosquitto)
command -v mosquitto_sub >/dev/null || need_pkgs+=(mosquitto-clients)
command -v openssl >/dev/null || need_pkgs+=(openssl)
# iproute2: tests/uplink_netlink.rs puts the agent in a network namespace behind a veth pair.
command -v ip >/dev/null || need_pkgs+=(iproute2)
# strace, e2fsprogs (mkfs.ext2, chattr, filefrag), losetup: tests/spool_damage.rs (a real
# EIO from a loop device, a directory sync, an immutable segment at the cap).
command -v strace >/dev/null || need_pkgs+=(strace)
command -v mkfs.ext2 >/dev/null && command -v chattr >/dev/null || need_pkgs+=(e2fsprogs)
command -v losetup >/dev/null || need_pkgs+=(mount)
# fsfreeze: tests/spool_hung_disk.rs hangs the spool's disk (a loop device's ext4).
command -v fsfreeze >/dev/null || need_pkgs+=(util-linux)
# libfaketime: tests/clock_real.rs sets the agent's wall clock before the build date.
compgen -G '/usr/lib/*/faketime/libfaketimeMT.so.1' >/dev/null || need_pkgs+=(faketime)
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

# The opendbc corpus of tests/opendbc_corpus.rs: the pinned wheel, fetched once into target/
# (the test checks its SHA-256, and fails saying this command when it is missing).
if [ ! -f target/opendbc/opendbc-0.3.1-py3-none-any.whl ]; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: opendbc==0.3.1 -d target/opendbc
fi

cargo fmt --all -- --check
# Both builds lint clean: the release one (no test hooks) and the test one.
cargo clippy --locked --all-targets -- -D warnings
cargo clippy --locked --all-targets --features test-hooks -- -D warnings
# The ECU test (test = false: scripts/ci-ecu.sh runs it) is linted all the same.
cargo clippy --locked --features test-hooks --test ecu_vm -- -D warnings
# The tests drive the agent through its test hooks (REDLINE_TEST_CLOCK_FILE,
# REDLINE_TEST_STALL_SAMPLER_AFTER_MS), which exist only with this feature; a test that
# needs one fails, saying so, without it. The release binary and the .deb never have it.
cargo test --locked --all-targets --features test-hooks
