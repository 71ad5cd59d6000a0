#!/usr/bin/env bash
# The ECU in a box: a Debian 12 image with systemd as PID 1, booted in QEMU (software
# emulation), amd64 or arm64 (`-M virt`, Cortex-A72). Built from Debian's packages with
# mmdebstrap (minbase + systemd, systemd-timesyncd, dbus, udev, iproute2, can-utils, kmod;
# no recommends), Debian's stock kernel and only the modules it needs (virtio, ext4, CAN,
# USB serial), a busybox initramfs that mounts the virtio disk and hands over to systemd.
# Cached under target/ecu-vm/ARCH and rebuilt when this script's image part changes.
#
# usage: scripts/ecu-vm.sh image ARCH            build the image if not cached; print its dir
#        scripts/ecu-vm.sh disk ARCH OUT         a fresh writable copy of the image's disk
#        scripts/ecu-vm.sh boot ARCH DISK [-f FILES.tar] [-p CTL_PORT] [-s SERIAL_SOCKET]
#                                 [-- KERNEL_ARGS...]
#                                                boot DISK (qemu in the foreground, console on
#                                                stdout; SIGKILL it to cut the power)
#        scripts/ecu-vm.sh demo [ARCH]           the README's "Try it on a virtual ECU" (root;
#                                                ARCH defaults to arm64)
# ARCH: amd64 | arm64.
# env: ECU_VM_DIR  cache (default target/ecu-vm of the crate)   ECU_VM_MEM (1024, MiB)
#      ECU_VM_SMP  guest CPUs (default 1)   ECU_VM_MIRROR (http://deb.debian.org/debian),
#      ECU_VM_SECURITY_MIRROR (http://deb.debian.org/debian-security)
#      ECU_VM_RTC  qemu -rtc base= (default utc: the host's time)
#
# The guest:
#  - root has no password; no getty; systemd-networkd gives the first NIC 10.0.2.15/24
#    (QEMU user networking: the host's loopback is 10.0.2.2, so a broker on the host's
#    127.0.0.1 is reached there);
#  - ecu-ctl.service (this script writes it into the image) connects to 10.0.2.2:CTL_PORT
#    (kernel argument ecu.ctl=PORT) and runs what the host sends, one command at a time,
#    as root: the host writes `RUN <id> <base64 of a bash script>`, the guest answers
#    `DONE <id> <rc> <base64 of stdout+stderr>`. Its first line is
#    `HELLO <boot id> <uptime s> <systemctl is-system-running>`. It reconnects after a
#    broken connection, and again at every boot;
#  - FILES.tar is the second virtio disk (serial `files`): `tar -xf /dev/disk/by-id/virtio-files`;
#  - SERIAL_SOCKET: a USB-serial adapter (QEMU's FTDI usb-serial on an xHCI controller, the
#    guest's /dev/ttyUSB0) whose other end is a Unix socket QEMU listens on: what the host
#    writes there, the guest reads from the tty.
# exit: image/disk: 0 ok; 2 setup failed (the message says what to install or fix).
#
# Needs root the first time (mmdebstrap, chroot, binfmt_misc for arm64, apt-get for the
# tools: mmdebstrap arch-test qemu-user-static e2fsprogs, and qemu's libraries). QEMU
# itself (qemu-system-x86, qemu-system-arm) is fetched with apt-get download and unpacked
# into the cache, never installed (as scripts/vcan-vm.sh does: installing qemu-system from
# bookworm would remove a qemu-utils from backports).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
W=${ECU_VM_DIR:-$here/target/ecu-vm}
MIRROR=${ECU_VM_MIRROR:-http://deb.debian.org/debian}
SECURITY=${ECU_VM_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SUITE=bookworm
APT=(apt-get -q -o DPkg::Lock::Timeout=600 -o APT::Sandbox::User=root)
export DEBIAN_FRONTEND=noninteractive

log() { printf '== ecu-vm: %s\n' "$*" >&2; }
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { print }' "$0" >&2; }
setup_failed() {
  printf 'ecu-vm: SETUP FAILED: %s\n' "$*" >&2
  cat >&2 <<EOF
  The virtual ECU is built once into $W from Debian 12's packages. It needs root on
  Debian 12 (bookworm) with its apt sources reachable, and installs with apt-get:
    mmdebstrap arch-test qemu-user-static e2fsprogs (and qemu-system's shared libraries);
  qemu-system-x86/qemu-system-arm and the kernels are fetched with apt-get download.
  Or prepare $W on such a machine (scripts/ecu-vm.sh image amd64; ... image arm64) and
  point ECU_VM_DIR at it.
EOF
  exit 2
}

# Kernel modules the image gets (with what they depend on). The initramfs loads the first
# group itself; udev/systemd load the rest from the root file system.
BOOT_MODULES="virtio_pci virtio_mmio virtio_blk crc32c_generic crc32c_intel crc32c_ce ext4"
ROOT_MODULES="virtio_net virtio_console virtio_rng vcan vxcan can can_raw can_bcm can_gw
  sch_netem usbserial ftdi_sio cdc_acm pl2303 xhci_pci xhci_hcd usbhid autofs4 rtc_pl031 efivarfs"
PACKAGES=systemd,systemd-sysv,systemd-timesyncd,dbus,udev,iproute2,can-utils,kmod

arch_facts() { # ARCH -> globals QEMU_BIN QEMU_PKG KFLAVOUR CONSOLE
  case $1 in
    amd64) QEMU_BIN=qemu-system-x86_64 QEMU_PKG=qemu-system-x86 KFLAVOUR=amd64 CONSOLE=ttyS0 ;;
    arm64) QEMU_BIN=qemu-system-aarch64 QEMU_PKG=qemu-system-arm KFLAVOUR=arm64 CONSOLE=ttyAMA0 ;;
    *) echo "ecu-vm: ARCH must be amd64 or arm64, not '$1'" >&2; exit 2 ;;
  esac
}

installed() { dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | grep -q '^ii'; }

host_tools() { # the host packages the build needs
  local need=() p
  for p in mmdebstrap arch-test e2fsprogs xz-utils cpio binutils; do installed "$p" || need+=("$p"); done
  [ "$1" = amd64 ] || installed qemu-user-static || need+=(qemu-user-static)
  if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || setup_failed "not root, and missing: ${need[*]} (apt-get install -y --no-install-recommends ${need[*]})"
    log "installing ${need[*]}"
    "${APT[@]}" install -y --no-install-recommends "${need[@]}" >&2 ||
      { "${APT[@]}" update >&2 && "${APT[@]}" install -y --no-install-recommends "${need[@]}" >&2; } ||
      setup_failed "apt-get install ${need[*]} failed"
  fi
}

# QEMU for both architectures, unpacked into $W/qemu (shared by the images).
prepare_qemu() {
  local Q=$W/qemu d
  [ -f "$Q/.ready" ] && return 0
  [ "$(id -u)" = 0 ] || setup_failed "not root, and $Q is not prepared yet"
  log "fetching qemu-system-x86 and qemu-system-arm into $Q (once)"
  rm -rf "$Q"; mkdir -p "$Q/debs" "$Q/root"
  (cd "$Q/debs" && "${APT[@]}" download qemu-system-x86 qemu-system-arm qemu-system-common \
     qemu-system-data seabios >&2) ||
    { "${APT[@]}" update >&2 && (cd "$Q/debs" && "${APT[@]}" download qemu-system-x86 qemu-system-arm \
       qemu-system-common qemu-system-data seabios >&2); } || setup_failed "apt-get download of qemu failed"
  local libs p missing=
  libs=$(for d in "$Q"/debs/qemu-system-*.deb; do dpkg-deb -f "$d" Depends; done | tr ',' '\n' |
         sed 's/|.*//; s/(.*//; s/ //g' | grep '^lib' | sort -u)
  for p in $libs; do installed "$p" || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    log "installing qemu's libraries:$missing"
    # shellcheck disable=SC2086
    "${APT[@]}" install -y --no-install-recommends --no-upgrade $missing >&2 ||
      setup_failed "apt-get install of qemu's libraries failed:$missing"
  fi
  for d in "$Q"/debs/*.deb; do dpkg-deb -x "$d" "$Q/root" || setup_failed "cannot unpack $d"; done
  for p in qemu-system-x86_64 qemu-system-aarch64; do
    if ldd "$Q/root/usr/bin/$p" | grep 'not found' >&2; then
      setup_failed "$p misses the libraries above: apt-get install the packages that hold them"
    fi
  done
  touch "$Q/.ready"
}

# binfmt_misc for qemu-aarch64 (foreign maintainer scripts in the arm64 chroot). Mounted
# and registered only if it was not; undone by binfmt_undo.
BINFMT_MOUNTED= BINFMT_REGISTERED=
binfmt_setup() {
  local bf=/proc/sys/fs/binfmt_misc
  if [ ! -e $bf/register ]; then
    mount -t binfmt_misc binfmt_misc $bf || setup_failed "cannot mount binfmt_misc (needed for the arm64 root file system)"
    BINFMT_MOUNTED=1
  fi
  if [ ! -e $bf/qemu-aarch64 ]; then
    [ -f /usr/lib/binfmt.d/qemu-aarch64.conf ] || setup_failed "no /usr/lib/binfmt.d/qemu-aarch64.conf (qemu-user-static)"
    cat /usr/lib/binfmt.d/qemu-aarch64.conf > $bf/register || setup_failed "cannot register qemu-aarch64 in binfmt_misc"
    BINFMT_REGISTERED=1
  fi
}
binfmt_undo() {
  local bf=/proc/sys/fs/binfmt_misc
  if [ -n "$BINFMT_REGISTERED" ] && [ -e $bf/qemu-aarch64 ]; then echo -1 > $bf/qemu-aarch64 || true; fi
  if [ -n "$BINFMT_MOUNTED" ]; then umount $bf || true; fi
}

# The guest's control loop (see the header).
guest_ctl() {
  cat <<'EOF'
#!/bin/bash
# ecu-ctl: runs what the test host sends (scripts/ecu-vm.sh of redline-agent).
port=$(sed -n 's/.*ecu\.ctl=\([0-9][0-9]*\).*/\1/p' /proc/cmdline)
[ -n "$port" ] || { echo "ecu-ctl: no ecu.ctl=PORT on the kernel command line"; exec sleep infinity; }
while :; do
  if exec 3<>"/dev/tcp/10.0.2.2/$port"; then
    state=$(systemctl is-system-running 2>/dev/null)
    echo "HELLO $(cat /proc/sys/kernel/random/boot_id) $(cut -d' ' -f1 /proc/uptime) $state" >&3
    while IFS=' ' read -r verb id b64 <&3; do
      [ "$verb" = RUN ] || continue
      printf '%s' "$b64" | base64 -d > /run/ecu-cmd.sh
      bash /run/ecu-cmd.sh < /dev/null > /run/ecu-cmd.out 2>&1; rc=$?
      echo "DONE $id $rc $(base64 -w0 < /run/ecu-cmd.out)" >&3
    done
    exec 3>&- 3<&-
  fi
  sleep 0.3
done
EOF
}

customize_root() { # ROOT ARCH KVER
  local r=$1
  echo ecu > "$r/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 ecu\n10.0.2.2 host.test\n' > "$r/etc/hosts"
  # A fixed machine id: no first-boot presets at every run; the same id across power cuts.
  echo 2b6d1d3c5a0e4b7f9e8d7c6b5a493827 > "$r/etc/machine-id"
  chroot "$r" passwd -dq root
  : > "$r/etc/fstab"
  mkdir -p "$r/etc/systemd/network" "$r/var/log/journal"
  cat > "$r/etc/systemd/network/20-wired.network" <<'EOF'
[Match]
Name=en* eth*
[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
DNS=10.0.2.3
LinkLocalAddressing=no
IPv6AcceptRA=no
EOF
  # No logins on the console (it is the test's log); nothing waits for "online".
  for u in serial-getty@.service getty@.service getty-static.service systemd-networkd-wait-online.service \
           apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
    ln -sf /dev/null "$r/etc/systemd/system/$u"
  done
  install -m 0755 /dev/stdin "$r/usr/local/sbin/ecu-ctl" < <(guest_ctl)
  cat > "$r/etc/systemd/system/ecu-ctl.service" <<'EOF'
[Unit]
Description=Test host control channel (scripts/ecu-vm.sh)
After=systemd-networkd.service
[Service]
ExecStart=/usr/local/sbin/ecu-ctl
Restart=always
RestartSec=1
[Install]
WantedBy=multi-user.target
EOF
  # vcan0 exists and is up at every boot, as the car's can0 would be.
  echo vcan > "$r/etc/modules-load.d/vcan.conf"
  cat > "$r/etc/systemd/network/10-vcan0.netdev" <<'EOF'
[NetDev]
Name=vcan0
Kind=vcan
EOF
  cat > "$r/etc/systemd/network/10-vcan0.network" <<'EOF'
[Match]
Name=vcan0
[Network]
LinkLocalAddressing=no
IPv6AcceptRA=no
EOF
  chroot "$r" systemctl enable -q systemd-networkd.service ecu-ctl.service
  # Time from the test host (an SNTP server on its 127.0.0.1:123, i.e. 10.0.2.2 here), as a
  # car takes it from NTP or GPS.
  mkdir -p "$r/etc/systemd/timesyncd.conf.d"
  printf '[Time]\nNTP=10.0.2.2\nFallbackNTP=\nPollIntervalMinSec=16\n' > "$r/etc/systemd/timesyncd.conf.d/ecu.conf"
  # journald: persistent (power-cut evidence survives), small.
  mkdir -p "$r/etc/systemd/journald.conf.d"
  printf '[Journal]\nStorage=persistent\nSystemMaxUse=64M\nForwardToConsole=no\n' \
    > "$r/etc/systemd/journald.conf.d/ecu.conf"
  rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/*_Packages "$r/tmp/"*
}

# Installs the modules of BOOT_MODULES and ROOT_MODULES (and their dependencies) from the
# unpacked kernel package $K into ROOT; writes the initramfs's load order to $1.list.
install_modules() { # ROOT K KVER OUTLIST
  local r=$1 k=$2 kver=$3 list=$4 dep
  mkdir -p "$r/tmp/kall/lib/modules"
  cp -a "$k/lib/modules/$kver" "$r/tmp/kall/lib/modules/"
  chroot "$r" depmod -b /tmp/kall "$kver"
  dep=$r/tmp/kall/lib/modules/$kver/modules.dep
  closure() {
    awk -v want="$*" '
      { key = $1; sub(/:$/, "", key); n = split(key, a, "/"); name = a[n]
        sub(/\.ko(\.[a-z]+)?$/, "", name); gsub(/-/, "_", name); path[name] = key; deps[name] = ""
        for (i = 2; i <= NF; i++) { m = split($i, b, "/"); d = b[m]; sub(/\.ko(\.[a-z]+)?$/, "", d)
          gsub(/-/, "_", d); deps[name] = deps[name] " " d } }
      function visit(m,  k, arr, i) { if (m in seen) return; seen[m] = 1; if (!(m in path)) return
        k = split(deps[m], arr, " "); for (i = k; i >= 1; i--) visit(arr[i]); print path[m] }
      END { n = split(want, w, " "); for (i = 1; i <= n; i++) { x = w[i]; gsub(/-/, "_", x); visit(x) } }' "$dep"
  }
  # shellcheck disable=SC2086
  closure $BOOT_MODULES > "$list"
  local m
  # shellcheck disable=SC2086
  for m in $( (cat "$list"; closure $ROOT_MODULES) | sort -u); do
    mkdir -p "$r/lib/modules/$kver/$(dirname "$m")"
    cp "$k/lib/modules/$kver/$m" "$r/lib/modules/$kver/$m"
  done
  cp "$k/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$r/lib/modules/$kver/" 2>/dev/null || true
  rm -rf "$r/tmp/kall"
  chroot "$r" depmod -a "$kver"
  grep -q vcan "$r/lib/modules/$kver/modules.dep" || setup_failed "the kernel package has no vcan module"
}

make_initramfs() { # BUSYBOX K KVER LIST OUT
  local bb=$1 k=$2 kver=$3 list=$4 out=$5 I m
  I=$(mktemp -d)
  mkdir -p "$I"/{bin,proc,sys,dev,newroot,lib/modules}
  cp "$bb" "$I/bin/busybox"
  while read -r m; do cp "$k/lib/modules/$kver/$m" "$I/lib/modules/"; echo "${m##*/}"; done < "$list" > "$I/modules.list"
  cat > "$I/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules.list); do insmod /lib/modules/$m 2>/dev/null; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do usleep 50000; i=$((i + 1)); done
if ! mount -t ext4 -o rw /dev/vda /newroot; then
  echo "ecu-vm initramfs: cannot mount /dev/vda"; ls /dev; poweroff -f
fi
umount /sys /proc
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/init
EOF
  chmod +x "$I/init"
  (cd "$I" && find . | cpio -o -H newc -R 0:0 --quiet | gzip -1) > "$out"
  rm -rf "$I"
}

build_image() { # ARCH DIR
  local arch=$1 d=$2 r t0 kpkg kver K
  arch_facts "$arch"
  [ "$(id -u)" = 0 ] || setup_failed "not root, and the $arch image is not built yet"
  host_tools "$arch"
  t0=$(date +%s)
  rm -rf "$d"; mkdir -p "$d/debs"; r=$d/root
  [ "$arch" = amd64 ] || binfmt_setup
  log "mmdebstrap $SUITE $arch (minbase + $PACKAGES)"
  # The kernel and busybox-static come from the same archive, fetched with the chroot's own
  # apt (so no foreign architecture on the host's dpkg).
  local hook=$d/fetch-hook.sh
  {
    echo '#!/bin/sh'
    echo 'set -e'
    echo "k=\$(chroot \"\$1\" apt-cache depends linux-image-$KFLAVOUR | sed -n 's/.*Depends: \\(linux-image-[0-9][^ ]*\\).*/\\1/p' | head -n1)"
    echo '[ -n "$k" ]'
    echo 'chroot "$1" sh -c "cd /tmp && apt-get -q -o APT::Sandbox::User=root download $k busybox-static"'
    echo "mv \"\$1\"/tmp/*.deb '$d/debs/'"
  } > "$hook"
  chmod +x "$hook"
  mmdebstrap --mode=root --architectures="$arch" --variant=minbase --include="$PACKAGES" \
    --aptopt='APT::Install-Recommends "false"' --aptopt='Acquire::Retries "3"' \
    --customize-hook="$hook" "$SUITE" "$r" "deb $MIRROR $SUITE main" \
    "deb $MIRROR $SUITE-updates main" "deb $SECURITY $SUITE-security main" >&2 ||
    { binfmt_undo; setup_failed "mmdebstrap failed (see above)"; }
  log "mmdebstrap done in $(( $(date +%s) - t0 ))s"
  kpkg=$(ls "$d"/debs/linux-image-*.deb) || setup_failed "no kernel package fetched"
  K=$d/kernel; mkdir -p "$K"
  dpkg-deb -x "$kpkg" "$K"
  kver=$(ls "$K/lib/modules")
  install_modules "$r" "$K" "$kver" "$d/initramfs.modules"
  customize_root "$r" "$arch" "$kver"
  [ "$arch" = amd64 ] || binfmt_undo
  mkdir -p "$d/bb"; dpkg-deb -x "$d"/debs/busybox-static_*.deb "$d/bb"
  make_initramfs "$d/bb/bin/busybox" "$K" "$kver" "$d/initramfs.modules" "$d/initrd.gz"
  if [ "$arch" = amd64 ]; then
    # The ELF vmlinux inside vmlinuz boots via PVH: no BIOS, no decompressor (faster).
    local k off
    k=$(echo "$K"/boot/vmlinuz-*)
    off=$(LC_ALL=C grep -abo $'\xfd7zXZ\x00' "$k" | head -1 | cut -d: -f1 || true)
    [ -n "$off" ] && tail -c +$((off + 1)) "$k" | xz -dc > "$d/vmlinux" 2>/dev/null || true
    readelf -n "$d/vmlinux" 2>/dev/null | grep -q 'type: (0x00000012)' || rm -f "$d/vmlinux"
    cp "$k" "$d/vmlinuz"
  else
    cp "$K"/boot/vmlinuz-* "$d/vmlinuz"   # a gzip'ed Image: qemu's -kernel takes it as is
  fi
  rm -rf "$K" "$d/bb" "$d/debs" "$hook"
  log "making the ext4 disk"
  mke2fs -q -F -t ext4 -L ecu-root -d "$r" "$d/disk.img" 1536M >&2 || setup_failed "mke2fs -d failed"
  rm -rf "$r"
  echo "$kver" > "$d/kernel-version"
  log "image $arch built in $(( $(date +%s) - t0 ))s ($(du -sh --apparent-size "$d/disk.img" | cut -f1) disk, $(du -sh "$d/disk.img" | cut -f1) used)"
}

image_key() { # what the image is made from: the functions that build it, the mirror, the suite
  { declare -f build_image customize_root guest_ctl install_modules make_initramfs
    echo "$BOOT_MODULES $ROOT_MODULES $PACKAGES $SUITE $MIRROR $SECURITY"; } | sha256sum | cut -c1-16
}

ensure_image() { # ARCH -> prints the image dir
  local arch=$1 d
  arch_facts "$arch"
  mkdir -p "$W" 2>/dev/null || setup_failed "cannot create $W"
  d=$W/$arch
  exec 9>>"$W/.lock"; flock 9
  prepare_qemu
  if [ ! -f "$d/.ready" ] || [ "$(cat "$d/.ready")" != "$(image_key)" ]; then
    build_image "$arch" "$d"
    image_key > "$d/.ready"
  fi
  flock -u 9
  echo "$d"
}

cmd=${1:-}; shift || true
case $cmd in
  image)
    [ $# = 1 ] || { usage; exit 2; }
    ensure_image "$1" ;;
  disk)
    [ $# = 2 ] || { usage; exit 2; }
    d=$(ensure_image "$1")
    cp --sparse=always "$d/disk.img" "$2" ;;
  boot)
    [ $# -ge 2 ] || { usage; exit 2; }
    arch=$1 disk=$2; shift 2
    arch_facts "$arch"
    files= port= serial=
    while [ $# -gt 0 ]; do
      case $1 in
        -f) files=$2; shift 2 ;;
        -p) port=$2; shift 2 ;;
        -s) serial=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "ecu-vm: unknown boot option $1" >&2; exit 2 ;;
      esac
    done
    d=$W/$arch
    [ -f "$d/.ready" ] || { echo "ecu-vm: no $arch image: run scripts/ecu-vm.sh image $arch first" >&2; exit 2; }
    Q=$W/qemu/root
    args=(-L "$Q/usr/share/qemu" -L "$Q/usr/share/seabios" -accel tcg -m "${ECU_VM_MEM:-1024}"
          -smp "${ECU_VM_SMP:-1}" -nodefaults -no-user-config -display none -serial stdio
          -rtc "base=${ECU_VM_RTC:-utc}"
          -drive "file=$disk,format=raw,if=none,id=root,cache=writeback" -device virtio-blk-pci,drive=root,serial=root
          -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile=
          -initrd "$d/initrd.gz")
    if [ -n "$files" ]; then
      args+=(-drive "file=$files,format=raw,if=none,id=files,readonly=on" -device virtio-blk-pci,drive=files,serial=files)
    fi
    if [ -n "$serial" ]; then
      args+=(-device qemu-xhci,id=xhci -chardev "socket,id=ser0,path=$serial,server=on,wait=off"
             -device usb-serial,bus=xhci.0,chardev=ser0)
    fi
    cmdline="console=$CONSOLE ecu.ctl=${port:-0} rw quiet loglevel=4 systemd.show_status=false $*"
    if [ "$arch" = amd64 ]; then
      kernel=$d/vmlinux; [ -s "$kernel" ] || kernel=$d/vmlinuz
      args+=(-kernel "$kernel")
    else
      args+=(-M virt -cpu cortex-a72 -kernel "$d/vmlinuz")
    fi
    exec "$Q/usr/bin/$QEMU_BIN" "${args[@]}" -append "$cmdline" < /dev/null ;;
  demo)
    # The README's "Try it on a virtual ECU": the package (built here if target/debian has
    # none), the image, then tests/ecu_vm.rs's try_it_on_a_virtual_ecu, which boots the box,
    # installs and starts the service and prints the readings as they arrive on this machine.
    arch=${1:-arm64}
    arch_facts "$arch"
    [ "$(id -u)" = 0 ] || { echo "ecu-vm: demo: run as root (the image is built with mmdebstrap; the guest's time server binds 127.0.0.1:123)" >&2; exit 2; }
    cd "$here"
    debs=${REDLINE_DEB_DIR:-$here/target/debian}
    if ! compgen -G "$debs/redline-agent_*_$arch.deb" >/dev/null; then
      log "no $arch package in $debs: building it (cargo-deb; for arm64 Debian's cross toolchain)"
      if [ "$(cargo deb --version 2>/dev/null | awk '{print $2}')" != 3.8.0 ]; then
        cargo install cargo-deb --version 3.8.0 --locked
      fi
      if [ "$arch" = amd64 ]; then
        cargo deb --locked --output "$debs/"
      else
        scripts/ci-aarch64.sh
        CARGO_TARGET_DIR="${CARGO_TARGET_DIR_AARCH64:-$here/target/aarch64-debian}" cargo deb --locked \
          --no-build --no-strip --target aarch64-unknown-linux-gnu --output "$debs/"
      fi
    fi
    ensure_image "$arch" >/dev/null
    ECU_VM_ARCH=$arch REDLINE_DEB_DIR=$debs exec cargo test -q --locked --features test-hooks \
      --test ecu_vm -- --nocapture --exact try_it_on_a_virtual_ecu ;;
  *) usage; exit 2 ;;
esac
