#!/usr/bin/env bash
# Proves the aarch64 (ECU) build on a plain Debian 12 machine, as root, without Docker or
# rustup targets: Debian's own Rust (rustc-web/cargo-web from bookworm-security) with its
# arm64 std, gcc-aarch64-linux-gnu as linker (and C compiler for ring), and the binary run
# under qemu-aarch64-static. Idempotent: installs only what is missing.
#
# Usage: scripts/ci-aarch64.sh          (CARGO_TARGET_DIR defaults to target/aarch64-debian)
# Env:   REDLINE_MAX_BINARY_BYTES       size limit of the stripped binary (default 6 MiB)
#
# Users with Docker/Podman build the same target with `cross` (see Cross.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
BIN_NAME=redline-agent
MAX_BYTES=${REDLINE_MAX_BINARY_BYTES:-$((6 * 1024 * 1024))}
QEMU_TIMEOUT=120 # seconds per emulated run; qemu has been seen to hang (see below)

log() { printf '== ci-aarch64: %s\n' "$*" >&2; }
die() { printf 'ci-aarch64: FAIL: %s\n' "$*" >&2; exit 1; }

# --- 1. packages ----------------------------------------------------------------------
# rustc-web/cargo-web 1.96 come from bookworm-security (bookworm main has 1.85, below the
# crate's rust-version). libstd-rust-web-dev:arm64 is the arm64 std for that rustc (it must
# be the very same version, or rustc fails with E0514); it also pulls in libc6:arm64, which
# qemu-aarch64-static uses as the target's loader and libc.
PKGS=(rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu
      libc6-dev-arm64-cross binutils-aarch64-linux-gnu qemu-user-static file python3 ca-certificates)

installed() { dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | grep -q '^ii'; }
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
want_rust=$(sed -n 's/^rust-version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n1)
[ -n "$want_rust" ] || die "no rust-version in Cargo.toml"

toolchain_ok() {
  local have
  have=$(/usr/bin/rustc --version 2>/dev/null | awk '{print $2}') || return 1
  [ -n "$have" ] || return 1
  dpkg --compare-versions "$have" ge "$want_rust" || return 1
  # Debian's rustc and the arm64 std must be built from the same source version.
  [ "$(pkg_version rustc-web)" = "$(pkg_version libstd-rust-web-dev:arm64)" ] || return 1
}

missing=()
dpkg --print-foreign-architectures | grep -qx arm64 || missing+=(arch:arm64)
for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ] || ! toolchain_ok; then
  [ "$(id -u)" = 0 ] || die "missing or outdated: ${missing[*]:-rustc-web}; run as root (apt-get needed)"
  log "installing: ${missing[*]:-upgrades of the Debian Rust packages}"
  export DEBIAN_FRONTEND=noninteractive
  dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
  apt-get -q -o DPkg::Lock::Timeout=600 update
  apt-get -q -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${PKGS[@]}"
fi
toolchain_ok || die "Debian's rustc is $(/usr/bin/rustc --version 2>&1 | head -n1) (rustc-web $(pkg_version rustc-web), arm64 std $(pkg_version libstd-rust-web-dev:arm64)); the crate needs >= $want_rust: enable the bookworm-security suite (rustc-web 1.96) and rerun"

# --- 2. build with Debian's toolchain -------------------------------------------------
# rustup's ~/.cargo/bin proxies come first on PATH on developer machines: force Debian's
# cargo/rustc for this build, and keep a separate target dir so the two toolchains never
# share build artefacts (rustup's rustc cannot use Debian's std: E0514).
export PATH="/usr/bin:/bin:/usr/sbin:/sbin:$PATH"
export CARGO=/usr/bin/cargo RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
unset RUSTUP_TOOLCHAIN RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER RUSTFLAGS CARGO_BUILD_TARGET || true
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_AARCH64:-$PWD/target/aarch64-debian}"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc   # cc-rs (ring) would find it too
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TERM_COLOR=never

log "toolchain: $(/usr/bin/rustc --version); $(/usr/bin/cargo --version); $(aarch64-linux-gnu-gcc --version | head -n1)"
start=$(date +%s)
/usr/bin/cargo build --release --locked --target "$TARGET" --bin "$BIN_NAME"
build_secs=$(( $(date +%s) - start ))
log "build took ${build_secs}s (target dir $CARGO_TARGET_DIR)"

BIN="$CARGO_TARGET_DIR/$TARGET/release/$BIN_NAME"
[ -x "$BIN" ] || die "no binary at $BIN"
file -b "$BIN" | grep -q 'ARM aarch64' || die "not an aarch64 binary: $(file -b "$BIN")"

# --- 3. run it under qemu --------------------------------------------------------------
# Never `qemu-aarch64-static -L /usr/aarch64-linux-gnu`: that mixes the cross libc with
# libc6:arm64's loader and spins forever. binfmt_misc is not mounted in CI containers, so
# qemu is called explicitly. Every run has a timeout.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export TMPDIR="$work" # simulate's temporary spool
qemu() { timeout --kill-after=10 "$QEMU_TIMEOUT" qemu-aarch64-static "$BIN" "$@"; }

version=$(qemu --version) || die "--version failed under qemu"
log "--version: $version"
[[ "$version" == "$BIN_NAME "* ]] || die "unexpected --version output: $version"

for cfg in config/agent.toml config/bench.toml; do
  qemu check-config --no-files --config "$cfg" >"$work/check.out" 2>&1 \
    || { cat "$work/check.out" >&2; die "check-config --no-files --config $cfg failed under qemu"; }
  log "check-config --no-files --config $cfg: ok"
done

qemu simulate --stdout --speed max --duration 10s --seed 1 --start 2024-01-14T21:20:00Z \
  >"$work/sim.jsonl" 2>"$work/sim.err" \
  || { cat "$work/sim.err" >&2; die "simulate failed under qemu"; }
python3 - "$work/sim.jsonl" <<'PY' || die "simulate output check failed"
import json, sys
start = 1705267200000            # 2024-01-14T21:20:00Z in ms
keys = ["vehicle_id", "timestamp", "session_id", "brake_disc_temp_fl",
        "brake_disc_temp_fr", "engine_rpm", "engine_oil_temp"]
records = []
with open(sys.argv[1], encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        msg = json.loads(line)   # every line is one message: {"records":[...]}
        assert list(msg) == ["records"], f"line {n}: keys {list(msg)}"
        assert 1 <= len(msg["records"]) <= 500, f"line {n}: {len(msg['records'])} records"
        assert len(line.encode()) <= 128 * 1024, f"line {n}: over 128 KiB"
        records.extend(msg["records"])
assert len(records) == 100, f"{len(records)} records, want 100 (10 s at 10 Hz)"
sessions = {r["session_id"] for r in records}
assert len(sessions) == 1, f"{len(sessions)} session ids"
for i, r in enumerate(records):
    assert list(r) == keys, f"record {i}: keys {list(r)}"
    assert r["timestamp"] == start + 100 * i, f"record {i}: timestamp {r['timestamp']} not on the 100 ms grid"
    assert r["vehicle_id"] == "GT3-RACER-01", r["vehicle_id"]
    assert r["engine_rpm"] is None or isinstance(r["engine_rpm"], int), r["engine_rpm"]
print(f"simulate: {len(records)} records, {records[0]['timestamp']}..{records[-1]['timestamp']} on the 100 ms grid")
PY

# --- 4. size ---------------------------------------------------------------------------
# Measured on a stripped copy, so the limit holds whatever [profile.release] says.
aarch64-linux-gnu-strip -o "$work/stripped" "$BIN"
size=$(stat -c %s "$work/stripped")
printf 'aarch64 binary: %s bytes as built, %s bytes stripped (%s MiB; limit %s bytes); build %ss\n' \
  "$(stat -c %s "$BIN")" "$size" "$(awk -v s="$size" 'BEGIN{printf "%.2f", s/1048576}')" "$MAX_BYTES" "$build_secs"
[ "$size" -le "$MAX_BYTES" ] || die "stripped aarch64 binary is $size bytes, above $MAX_BYTES"
log "ok"
