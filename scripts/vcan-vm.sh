#!/usr/bin/env bash
# A real SocketCAN bus for tests, on machines whose kernel has no CAN (CI, containers): boots
# Debian's stock kernel in QEMU (software emulation) with a tiny busybox initramfs, loads
# the CAN modules, creates vcan0 (up), then runs a guest script or test executables inside.
#
# usage: scripts/vcan-vm.sh [-g GUEST_SCRIPT] [FILE...]
#   FILE...          copied to /files in the guest (on its PATH); ELF executables are
#                    stripped and the libraries `ldd` lists are copied along.
#   -g GUEST_SCRIPT  run with busybox sh in /files once vcan0 is up; its exit status is the
#                    result. Without -g each executable FILE is run (FILE.args: arguments).
# env: VCAN_VM_DIR  cache of the downloaded packages (default: target/vcan-vm of the crate)
#      VM_TIMEOUT   seconds before qemu is killed (default 150)   ACCEL (tcg)   VM_MEM (1024)
# exit: 0 passed; 1 failed (console on stdout); 2 the VM cannot be set up (qemu, the kernel
#      or busybox cannot be fetched: the message says how to get them); 124 timed out.
#
# Facts behind it (see also the project notes): KVM is not usable on these machines, TCG is
# fast enough; linux-image-amd64 (not -cloud-) has CAN as plain .ko files without
# modules.dep, so insmod in dependency order; the uncompressed ELF vmlinux boots via PVH
# (half the boot time); nothing is apt-get installed but qemu's shared libraries: installing
# qemu-system or the kernel would drag in (or remove) far more.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
W=${VCAN_VM_DIR:-$here/target/vcan-vm}
ACCEL=${ACCEL:-tcg}; VM_TIMEOUT=${VM_TIMEOUT:-150}; VM_MEM=${VM_MEM:-1024}
R=$W/root

guest=
while getopts g:h opt; do
  case $opt in
    g) guest=$OPTARG ;;
    *) sed -n '2,16p' "$0" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [ -n "$guest" ] && [ ! -f "$guest" ]; then echo "vcan-vm: no guest script $guest" >&2; exit 2; fi

setup_failed() {
  cat >&2 <<EOF
vcan-vm: SETUP FAILED: $*
  The test boots Debian 12's stock kernel in qemu. It fetches, once, into $W:
    linux-image-amd64's kernel, qemu-system-x86 qemu-system-common qemu-system-data seabios
    busybox-static can-utils (apt-get download, unpacked with dpkg-deb, never installed),
  and apt-get installs the shared libraries qemu-system-x86 needs (libcapstone4 libfdt1 ...).
  To get them: run this as root on Debian 12 (bookworm) with its apt sources reachable
  (apt-get update must work), or prepare $W once on such a machine as root
  (scripts/vcan-vm.sh with no arguments) and reuse it (VCAN_VM_DIR=that directory).
EOF
  exit 2
}

prepare() {
  local apt="apt-get -q -o DPkg::Lock::Timeout=600 -o APT::Sandbox::User=root"
  [ "$(id -u)" = 0 ] || setup_failed "not root, and $R is not prepared yet"
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || setup_failed "apt-get/dpkg-deb not found (not Debian?)"
  rm -rf "$R" "$W/debs" "$W/vmlinux"; mkdir -p "$W/debs" "$R"
  echo "vcan-vm: fetching qemu, the kernel and busybox into $W (once)" >&2
  $apt update >&2 || setup_failed "apt-get update failed"
  if ! command -v xz >/dev/null || ! command -v strip >/dev/null || ! command -v readelf >/dev/null; then
    DEBIAN_FRONTEND=noninteractive $apt install -y --no-install-recommends xz-utils binutils >&2 ||
      setup_failed "apt-get install xz-utils binutils failed"
  fi
  local kpkg
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  [ -n "$kpkg" ] || setup_failed "no linux-image-amd64 in the apt sources"
  (cd "$W/debs" && $apt download "$kpkg" qemu-system-x86 qemu-system-common qemu-system-data \
     seabios busybox-static can-utils >&2) || setup_failed "apt-get download failed"
  # qemu's shared libraries: the lib* packages its debs depend on (first alternative) that
  # are not installed yet; installed ones are left alone (no upgrade of the host's system).
  local libs p missing=
  libs=$(for d in "$W"/debs/qemu-system-x86_*.deb "$W"/debs/qemu-system-common_*.deb; do
           dpkg-deb -f "$d" Depends; done | tr ',' '\n' | sed 's/|.*//; s/(.*//; s/ //g' |
         grep '^lib' | sort -u)
  for p in $libs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $apt install -y --no-install-recommends --no-upgrade $missing >&2 ||
      setup_failed "apt-get install of qemu's libraries failed:$missing"
  fi
  for f in "$W"/debs/*.deb; do
    case $f in
      */linux-image-*) dpkg-deb --fsys-tarfile "$f" | tar -x -C "$R" --wildcards './boot/vmlinuz-*' \
          './lib/modules/*/kernel/net/can/*' './lib/modules/*/kernel/drivers/net/can/*' ;;
      *) dpkg-deb -x "$f" "$R" ;;
    esac || setup_failed "cannot unpack $f"
  done
  if ldd "$R/usr/bin/qemu-system-x86_64" | grep 'not found' >&2; then
    setup_failed "qemu-system-x86_64 misses the libraries above: apt-get install the packages that hold them"
  fi
  # The ELF vmlinux inside vmlinuz boots via PVH: no BIOS and no xz decompressor at boot.
  local k off
  k=$(echo "$R"/boot/vmlinuz-*)
  off=$(LC_ALL=C grep -abo $'\xfd7zXZ\x00' "$k" | head -1 | cut -d: -f1 || true)
  if [ -n "$off" ]; then tail -c +$((off + 1)) "$k" | xz -dc > "$W/vmlinux" 2>/dev/null || true; fi
  touch "$R/.ready"
}

mkdir -p "$W" 2>/dev/null || setup_failed "cannot create $W"
# One preparation at a time (tests may run in parallel); a half-done one is redone.
if { exec 9>>"$W/.lock"; } 2>/dev/null; then flock 9; fi
[ -f "$R/.ready" ] || prepare
flock -u 9 2>/dev/null || true

KERNEL=$W/vmlinux
if [ ! -s "$KERNEL" ] || ! readelf -n "$KERNEL" 2>/dev/null | grep -q 'type: (0x00000012)'; then
  KERNEL=$(echo "$R"/boot/vmlinuz-*)
fi
KDIR=$(echo "$R"/lib/modules/*/kernel)

I=$(mktemp -d "${TMPDIR:-/tmp}/vcan-vm.XXXXXX"); trap 'rm -rf "$I"' EXIT
mkdir -p "$I"/{bin,proc,sys,dev,tmp,lib/modules,files,usr/bin}; cp "$R/bin/busybox" "$I/bin/"
for m in drivers/net/can/dev/can-dev drivers/net/can/vcan drivers/net/can/vxcan net/can/can net/can/can-raw \
         net/can/can-bcm net/can/can-gw net/can/can-isotp net/can/j1939/can-j1939; do
  cp "$KDIR/$m.ko" "$I/lib/modules/"
done
copy_libs() {
  local l
  for l in $(ldd "$1" 2>/dev/null | grep -o '/[^ ]*'); do mkdir -p "$I${l%/*}"; cp -Ln "$l" "$I$l"; done
}
for b in candump cangen cansend; do cp "$R/usr/bin/$b" "$I/usr/bin/"; copy_libs "$I/usr/bin/$b"; done
is_elf() { [ "$(head -c 4 "$1" | od -An -c | tr -d ' ')" = '177ELF' ]; }
for f in "$@"; do
  [ -f "$f" ] || { echo "vcan-vm: no file $f" >&2; exit 2; }
  dest=$I/files/${f##*/}
  if is_elf "$f"; then
    # Debug builds are 20 to 100 MB; stripped they boot seconds faster.
    strip -o "$dest" "$f" 2>/dev/null || cp "$f" "$dest"
    copy_libs "$f"
  else
    cp "$f" "$dest"
  fi
done
if [ -n "$guest" ]; then cp "$guest" "$I/guest.sh"; fi

cat > "$I/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin; export PATH=/files:/bin:/usr/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in can-dev vcan vxcan can can-raw can-bcm can-gw can-isotp can-j1939; do
  insmod /lib/modules/$m.ko || echo "insmod $m FAILED"
done
ip link add dev vcan0 type vcan && ip link set up vcan0
rc=0
candump -n 5 -T 3000 vcan0 > /tmp/dump.txt & dpid=$!
sleep 0.2; cangen -n 5 -g 10 -I 123 -L 4 vcan0; wait $dpid
if [ "$(grep -c ' 123 ' /tmp/dump.txt)" = 5 ]; then echo "CAN-UTILS: PASS"; else echo "CAN-UTILS: FAIL"; rc=1; fi
cd /files
if [ -f /guest.sh ]; then
  echo "=== running the guest script"
  sh /guest.sh || { rc=$?; echo "GUEST SCRIPT: FAIL (rc=$rc)"; }
else
  for t in /files/*; do
    case $t in *.args) continue;; esac; [ -x "$t" ] || continue
    echo "=== running $t"; "$t" $(cat "$t.args" 2>/dev/null) || { echo "TEST $t: FAIL (rc=$?)"; rc=1; }
  done
fi
echo "VM-RESULT: rc=$rc"
[ "$rc" -le 127 ] || rc=127
printf "\\$(printf %o $rc)" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null   # isa-debug-exit
poweroff -f
EOF
chmod +x "$I/init"
(cd "$I" && find . | "$R/bin/busybox" cpio -o -H newc -R 0:0 2>/dev/null | gzip -1) > "$I.initrd.gz"
trap 'rm -rf "$I" "$I.initrd.gz"' EXIT
rm -rf "${I:?}"/*

set +e   # qemu's exit status = (guest rc << 1) | 1, so 1 == passed
timeout --foreground -k 5 "$VM_TIMEOUT" "$R/usr/bin/qemu-system-x86_64" -L "$R/usr/share/qemu" \
  -L "$R/usr/share/seabios" -accel "$ACCEL" -m "$VM_MEM" -smp 1 -nodefaults -no-user-config \
  -display none -serial stdio -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
  -kernel "$KERNEL" -initrd "$I.initrd.gz" -append "console=ttyS0 quiet panic=-1" \
  </dev/null 2>&1 | tee "$I/console.log"
qrc=${PIPESTATUS[0]}
set -e
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then echo "vcan-vm: TIMEOUT after ${VM_TIMEOUT}s"; exit 124; fi
if [ "$qrc" = 1 ] && grep -q 'VM-RESULT: rc=0' "$I/console.log"; then echo "vcan-vm: PASS"; exit 0; fi
echo "vcan-vm: FAIL (qemu rc=$qrc)"; exit 1
