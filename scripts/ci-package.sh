#!/usr/bin/env bash
# Builds the amd64 Debian package with cargo-deb, installs it on this machine and checks
# what it installed; then removes and purges it again (the checks cover the maintainer
# scripts' install, upgrade, remove and purge paths). Also builds the arm64 package from
# the aarch64 binary of scripts/ci-aarch64.sh when that binary exists.
#
# Usage: scripts/ci-package.sh     as root on Debian 12 (apt-get, dpkg); no running
#                                  systemd needed (CI containers have none as PID 1).
# Env:   REDLINE_KEEP_INSTALLED=1  leave the package installed at the end
#        REDLINE_ARM64_DEB=1       fail when the aarch64 binary is missing (default: skip)
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
PKG=redline-agent
UNIT=redline-agent.service
AARCH64_TARGET_DIR=${CARGO_TARGET_DIR_AARCH64:-$PWD/target/aarch64-debian}
export CARGO_TERM_COLOR=never DEBIAN_FRONTEND=noninteractive

log() { printf '== ci-package: %s\n' "$*" >&2; }
die() { printf 'ci-package: FAIL: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (installs the package)"
grep -q '^\[package.metadata.deb\]' Cargo.toml \
  || die "Cargo.toml has no [package.metadata.deb] section (binary, unit, conffile, maintainer scripts)"

# --- 1. tools ---------------------------------------------------------------------------
# systemd: systemd-analyze, systemd-sysusers (and a Depends of the package); gcc + libc6-dev
# to build cargo-deb; file to look at the binaries. Installing systemd in a container does
# not make it PID 1.
need=()
for p in systemd init-system-helpers gcc libc6-dev file; do
  dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get -q -o DPkg::Lock::Timeout=600 update
  apt-get -q -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${need[@]}"
fi
if [ "$(cargo deb --version 2>/dev/null | awk '{print $2}')" != "$CARGO_DEB_VERSION" ]; then
  log "installing cargo-deb $CARGO_DEB_VERSION"
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi

# --- 2. the unit itself -------------------------------------------------------------------
scripts/check-unit.sh

# --- 3. build the amd64 package -----------------------------------------------------------
rm -f target/debian/${PKG}_*_amd64.deb
cargo deb --locked --output target/debian/
deb=$(ls target/debian/${PKG}_*_amd64.deb)
log "built $deb ($(stat -c %s "$deb") bytes)"
dpkg-deb --info "$deb"
dpkg-deb --contents "$deb"

ctl=$(mktemp -d)
trap 'rm -rf "$ctl"' EXIT
dpkg-deb --control "$deb" "$ctl"
# The packaged binary (it runs on the car) has no test hooks: built without the `test-hooks`
# feature, it does not even contain their names.
no_test_hooks() { # binary what
  local hook n
  for hook in REDLINE_TEST_CLOCK_FILE REDLINE_TEST_STALL_SAMPLER_AFTER_MS "test hook"; do
    n=$(grep -c -a -F "$hook" "$1" || true)
    [ "$n" = 0 ] || die "$2 contains '$hook' ($n line(s)): built with the test-hooks feature"
  done
  echo "ok: $2 has no test hooks"
}
dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/redline-agent >"$ctl/amd64-bin"
no_test_hooks "$ctl/amd64-bin" "the binary in $deb"
for f in agent.toml redline-gt3.dbc; do
  grep -qx "/etc/redline-agent/$f" "$ctl/conffiles" || die "$f is not a conffile"
done
grep -q 'systemd-sysusers.*redline-agent.conf' "$ctl/postinst" || die "postinst does not run systemd-sysusers"
grep -q 'deb-systemd-helper enable redline-agent.service' "$ctl/postinst" || die "postinst does not enable the unit"
# Enabled but not started on a first install: only try-restart (a running agent) on upgrades.
if grep -nE 'deb-systemd-invoke (start|restart|"?\$_dh_action)|_dh_action=start' "$ctl/postinst"; then
  die "postinst would start the service"
fi
grep -q 'deb-systemd-invoke try-restart redline-agent.service' "$ctl/postinst" || die "postinst does not try-restart on upgrade"
dpkg-deb --field "$deb" Depends | grep -q systemd || die "Depends lacks systemd"

# --- 4. install, check, upgrade, check ---------------------------------------------------
if dpkg-query -W -f='${db:Status-Abbrev}' "$PKG" 2>/dev/null | grep -q '^.[^n]'; then
  log "purging the installed $PKG first"
  dpkg --purge "$PKG"
fi

check_mode() { # path owner:group mode
  local got
  got=$(stat -c '%U:%G %a' "$1" 2>/dev/null) || die "$1 is missing"
  [ "$got" = "$2 $3" ] || die "$1 is $got, want $2 $3"
  echo "ok: $1 $got"
}

check_installed() {
  check_mode /usr/bin/redline-agent root:root 755
  check_mode /usr/lib/systemd/system/$UNIT root:root 644
  cmp /usr/lib/systemd/system/$UNIT systemd/$UNIT || die "installed unit differs from systemd/$UNIT"
  [ -e /lib/systemd/system/$UNIT ] || die "/lib/systemd/system/$UNIT is missing"
  check_mode /usr/lib/sysusers.d/redline-agent.conf root:root 644
  check_mode /etc/redline-agent root:redline-agent 750
  check_mode /etc/redline-agent/agent.toml root:root 644
  check_mode /etc/redline-agent/redline-gt3.dbc root:root 644
  check_mode /var/lib/redline-agent redline-agent:redline-agent 750
  dpkg-query -W -f='${Conffiles}\n' "$PKG" | grep -q '^ /etc/redline-agent/agent.toml ' \
    || die "dpkg does not list /etc/redline-agent/agent.toml as a conffile"

  local pw uid
  pw=$(getent passwd redline-agent) || die "no user redline-agent"
  uid=$(echo "$pw" | cut -d: -f3)
  [ "$uid" -lt 1000 ] || die "redline-agent is not a system user (uid $uid)"
  echo "$pw" | grep -q ':/usr/sbin/nologin$' || die "redline-agent has a login shell: $pw"
  id -nG redline-agent | tr ' ' '\n' | grep -qx dialout || die "redline-agent is not in dialout: $(id -nG redline-agent)"
  echo "ok: user $pw, groups $(id -nG redline-agent)"

  # Enabled: systemctl is not usable without systemd as PID 1, so look at the symlink.
  local wants=/etc/systemd/system/multi-user.target.wants/$UNIT
  [ -L "$wants" ] || die "$wants missing: unit not enabled"
  case "$(readlink "$wants")" in
    /lib/systemd/system/$UNIT | /usr/lib/systemd/system/$UNIT) ;;
    *) die "$wants points to $(readlink "$wants")" ;;
  esac
  echo "ok: enabled ($wants -> $(readlink "$wants"))"
  [ "$(systemctl --root=/ is-enabled $UNIT 2>/dev/null || true)" = enabled ] \
    || die "systemctl --root=/ is-enabled $UNIT: $(systemctl --root=/ is-enabled $UNIT 2>&1 || true)"

  local out
  out=$(systemd-analyze verify /usr/lib/systemd/system/$UNIT 2>&1) || die "systemd-analyze verify failed: $out"
  [ -z "$out" ] || die "systemd-analyze verify printed: $out"
  echo "ok: systemd-analyze verify /usr/lib/systemd/system/$UNIT is clean"

  # The service user can read its configuration through the 0750 directory.
  runuser -u redline-agent -- /usr/bin/redline-agent check-config --no-files \
    --config /etc/redline-agent/agent.toml >/dev/null || die "check-config as redline-agent failed"
  echo "ok: $(/usr/bin/redline-agent --version); check-config as redline-agent"
}

log "installing $deb"
apt-get -q -o DPkg::Lock::Timeout=600 install -y "./$deb"
check_installed
log "reinstalling (the upgrade path of the maintainer scripts)"
dpkg -i "$deb"
check_installed

if [ "${REDLINE_KEEP_INSTALLED:-0}" != 1 ]; then
  log "removing"
  dpkg --remove "$PKG"
  [ ! -e /usr/bin/redline-agent ] || die "binary left after remove"
  [ -e /etc/redline-agent/agent.toml ] || die "remove deleted the conffile"
  log "purging"
  dpkg --purge "$PKG"
  [ ! -e /etc/redline-agent/agent.toml ] || die "purge left agent.toml"
  [ ! -e /etc/systemd/system/multi-user.target.wants/$UNIT ] || die "purge left the enablement symlink"
  ! dpkg-statoverride --list /etc/redline-agent >/dev/null || die "purge left the statoverride"
  echo "ok: remove and purge (user redline-agent and /var/lib/redline-agent are kept on purge)"
fi

# --- 5. arm64 package from the Debian-route aarch64 binary (scripts/ci-aarch64.sh) ------
arm_bin="$AARCH64_TARGET_DIR/aarch64-unknown-linux-gnu/release/redline-agent"
if [ -x "$arm_bin" ]; then
  rm -f target/debian/${PKG}_*_arm64.deb
  # --no-build: the binary was built by Debian's rustc; cargo-deb only packages it.
  # --no-strip: [profile.release] strips already (and this host's strip is for amd64).
  CARGO_TARGET_DIR="$AARCH64_TARGET_DIR" cargo deb --locked --no-build --no-strip \
    --target aarch64-unknown-linux-gnu --output target/debian/
  arm_deb=$(ls target/debian/${PKG}_*_arm64.deb)
  [ "$(dpkg-deb --field "$arm_deb" Architecture)" = arm64 ] || die "$arm_deb is not arm64"
  dpkg-deb --fsys-tarfile "$arm_deb" | tar -xO ./usr/bin/redline-agent >"$ctl/arm-bin"
  file -b "$ctl/arm-bin" | grep -q 'ARM aarch64' || die "binary in $arm_deb is not aarch64"
  no_test_hooks "$ctl/arm-bin" "the binary in $arm_deb"
  dpkg-deb --info "$arm_deb" | sed -n '/Package:/,$p'
  log "built $arm_deb ($(stat -c %s "$arm_deb") bytes)"
elif [ "${REDLINE_ARM64_DEB:-0}" = 1 ]; then
  die "no aarch64 binary at $arm_bin: run scripts/ci-aarch64.sh first"
else
  log "no aarch64 binary at $arm_bin (scripts/ci-aarch64.sh): arm64 package skipped"
fi
log "ok"
