#!/usr/bin/env bash
# Install what tests/guest/run_in_guest.py needs on Debian 12, idempotently and quietly:
# QEMU (TCG), a static busybox, gcc + KVM headers for the XCR0 shim, and a Debian kernel
# extracted (not installed) into the harness's cache.  Needs root (apt-get).
#
# With --xcr0-kernel, also what building the ARCH_SET_XCR0 test kernel takes
# (linux-source-6.1 and the kernel's build tools), then builds it with
# tests/kernel/build.sh unless it is already cached (19 CPU-minutes: ~10 min on 2 idle cores).
set -euo pipefail

cache="${XCR0RUN_GUEST_CACHE:-$HOME/.cache/xcr0run-guest}"
packages=(qemu-system-x86 busybox-static gcc libc6-dev linux-libc-dev)
xcr0_kernel=0
[[ "${1:-}" == --xcr0-kernel ]] && xcr0_kernel=1
if ((xcr0_kernel)); then
    packages+=(linux-source-6.1 make bc bison flex libelf-dev libssl-dev xz-utils patch)
fi
export DEBIAN_FRONTEND=noninteractive

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
        || missing+=("$pkg")
done
updated=0
if ((${#missing[@]})); then
    apt-get update -qq
    updated=1
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The guest kernel: whatever linux-image-amd64 currently depends on (no pinned version).
if ! compgen -G "$cache/kernel/boot/vmlinuz-*" >/dev/null; then
    ((updated)) || apt-get update -qq
    image=$(apt-cache depends linux-image-amd64 \
        | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    [[ -n "$image" ]] || { echo "setup.sh: cannot resolve linux-image-amd64" >&2; exit 1; }
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$image")
    dpkg-deb -x "$tmp"/linux-image-*.deb "$tmp/x"
    # Keep only what the initramfs may draw on (about 55 of 400 MB).
    shopt -s nullglob
    for moddir in "$tmp"/x/lib/modules/*/kernel "$tmp"/x/usr/lib/modules/*/kernel; do
        keep="$tmp/keep"
        mkdir -p "$keep/drivers" "$keep/net"
        for d in arch block crypto fs lib mm virt; do
            [[ -d "$moddir/$d" ]] && mv "$moddir/$d" "$keep/"
        done
        for d in drivers/virtio drivers/crypto net/9p; do
            [[ -d "$moddir/$d" ]] && mv "$moddir/$d" "$keep/$d"
        done
        rm -rf "$moddir"
        mv "$keep" "$moddir"
    done
    rm -rf "$tmp/x/usr/share" "$tmp"/x/boot/System.map-*
    mkdir -p "$cache"
    rm -rf "$cache/kernel"
    mv "$tmp/x" "$cache/kernel"
fi

if ((xcr0_kernel)); then
    bash "$(dirname "$0")/../kernel/build.sh" >/dev/null
fi
