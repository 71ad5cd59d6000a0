#!/usr/bin/env bash
# CI step of issue 13, "the ECU in a box": the arm64 Debian package on a virtual ECU.
# scripts/ecu-vm.sh builds (once, cached in target/ecu-vm) a Debian 12 arm64 image with
# systemd as PID 1 and boots it under qemu-system-aarch64 (TCG, -M virt); tests/ecu_vm.rs
# installs the package there with `apt install ./redline-agent_*_arm64.deb` and runs the
# service scenarios against a real Mosquitto with mutual TLS on this machine (10.0.2.2 in
# the guest): READY and STATUS, readings from vcan0 in the documented schema, the sandbox
# (exposure, LoadCredential, no SECCOMP/EPERM, a strict-filter pass), TLS reconnect,
# watchdog, kill -9, upgrade, power cut with a wrong RTC, a garage boot on GPS time from the
# CAN bus without NTP, the CPU cost on a live bus, and a clean stop. It prints the time of
# each scenario and the measured figures.
#
# Usage: scripts/ci-ecu.sh             as root on Debian 12, after scripts/ci-aarch64.sh and
#                                      scripts/ci-package.sh (they build the arm64 .deb)
# Env:   ECU_VM_ARCH=amd64             the scenarios on an amd64 VM instead (needs the amd64 .deb)
#        REDLINE_DEB_DIR               where the .deb is (default target/debian)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never DEBIAN_FRONTEND=noninteractive
ARCH=${ECU_VM_ARCH:-arm64}
DEB_DIR=${REDLINE_DEB_DIR:-$PWD/target/debian}
export ECU_VM_ARCH=$ARCH REDLINE_DEB_DIR=$DEB_DIR

log() { printf '== ci-ecu: %s\n' "$*" >&2; }
die() { printf 'ci-ecu: FAIL: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root: the image is built with mmdebstrap (chroot, binfmt_misc) and the guest's time server binds 127.0.0.1:123"
start=$(date +%s)

# The broker on the host (scripts/test.sh installs it too).
need=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_sub >/dev/null || need+=(mosquitto-clients)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get -q -o DPkg::Lock::Timeout=600 update
  apt-get -q -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${need[@]}"
fi

compgen -G "$DEB_DIR/redline-agent_*_$ARCH.deb" >/dev/null ||
  die "no redline-agent_*_$ARCH.deb in $DEB_DIR: run scripts/ci-aarch64.sh (arm64) and scripts/ci-package.sh first"

# The image: built from Debian's packages on first use (about 2 minutes), then cached.
t=$(date +%s)
scripts/ecu-vm.sh image "$ARCH" >/dev/null || die "scripts/ecu-vm.sh image $ARCH failed (see above)"
log "image $ARCH ready in $(( $(date +%s) - t ))s"

t=$(date +%s)
cargo test --locked --features test-hooks --test ecu_vm -- --nocapture --exact ecu_in_a_box
log "scenarios in $(( $(date +%s) - t ))s; whole step $(( $(date +%s) - start ))s"
