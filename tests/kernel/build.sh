#!/usr/bin/env bash
# Build the ARCH_SET_XCR0 test kernel: Debian's linux-source-6.1 + arch-set-xcr0.patch,
# configured from tinyconfig + xcr0.config (everything built in, no modules).
#
# The result is cached outside the checkout, keyed by the patch, the config fragment
# and the source package's version:
#     ${XCR0RUN_GUEST_CACHE:-~/.cache/xcr0run-guest}/xcr0-kernel/<key>/{vmlinux,bzImage,...}
# A second run with the same inputs only prints the directory. Prints the directory on
# stdout; progress on stderr. Needs: linux-source-6.1, gcc, make, bc, bison, flex,
# libelf-dev, libssl-dev (tests/guest/setup.sh --xcr0-kernel installs them).
#
#   tests/kernel/build.sh            build if missing, print the cache directory
#   tests/kernel/build.sh --key      print the cache directory only (no build)
#   JOBS=4 tests/kernel/build.sh     parallel jobs (default 2)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache="${XCR0RUN_GUEST_CACHE:-$HOME/.cache/xcr0run-guest}/xcr0-kernel"
tarball=/usr/src/linux-source-6.1.tar.xz
jobs=${JOBS:-2}

src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || true)
if [[ -z "$src_version" || ! -f "$tarball" ]]; then
    echo "build.sh: linux-source-6.1 is not installed (run tests/guest/setup.sh --xcr0-kernel)" >&2
    exit 1
fi
key=$(cat "$here/arch-set-xcr0.patch" "$here/xcr0.config" <(echo "linux-source-6.1 $src_version") |
    sha256sum | cut -c1-16)
out="$cache/$key"
if [[ "${1:-}" == --key ]]; then
    echo "$out"
    exit 0
fi
if [[ -f "$out/vmlinux" && -f "$out/bzImage" ]]; then
    echo "$out"
    exit 0
fi

# On a shared machine that briefly runs out of processes ("Resource temporarily
# unavailable", "Cannot fork": seen on the CI machine), any step may fail through no
# fault of its own. Every step can be repeated, so each is retried; a real error fails
# the same way every time, and quickly (make resumes where it stopped).
retry() {
    local attempt
    for attempt in 1 2 3 4 5; do
        "$@" && return 0
        if ((attempt < 5)); then
            echo "build.sh: $1 failed (attempt $attempt); retrying" >&2
            sleep 10
        fi
    done
    return 1
}

mkdir -p "$cache"
work=$(mktemp -d "$cache/build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
echo "build.sh: linux-source-6.1 $src_version + arch-set-xcr0.patch in $work" >&2
tree="$work/linux-source-6.1"
extract() {
    rm -rf "$tree" && tar -C "$work" -xJf "$tarball" &&
        patch -d "$tree" -p1 --quiet <"$here/arch-set-xcr0.patch"
}
configure() {
    make -C "$tree" -s tinyconfig >/dev/null &&
        "$tree/scripts/kconfig/merge_config.sh" -m -O "$tree" "$tree/.config" \
            "$here/xcr0.config" >/dev/null &&
        make -C "$tree" -s olddefconfig
}
compile() { make -C "$tree" -s -j"$jobs" vmlinux bzImage >>"$work/build.log" 2>&1; }
retry extract
retry configure
# merge_config.sh only warns about options Kconfig dropped; here that is an error.
missing=()
while IFS= read -r line; do
    case "$line" in
    CONFIG_*=n) grep -q "^${line%=n}=" "$tree/.config" && missing+=("$line") ;;
    CONFIG_*) grep -qx "$line" "$tree/.config" || missing+=("$line") ;;
    esac
done <"$here/xcr0.config"
if ((${#missing[@]})); then
    echo "build.sh: options Kconfig did not take: ${missing[*]}" >&2
    exit 1
fi

echo "build.sh: make -j$jobs vmlinux bzImage" >&2
if ! retry compile; then
    tail -40 "$work/build.log" >&2
    echo "build.sh: kernel build failed" >&2
    exit 1
fi
seconds=$(($(date +%s) - start))

stage="$work/out"
mkdir -p "$stage"
cp "$tree/vmlinux" "$tree/arch/x86/boot/bzImage" "$tree/.config" "$tree/System.map" "$stage/"
cp "$here/arch-set-xcr0.patch" "$stage/"
make -C "$tree" -s kernelrelease >"$stage/release"
echo "$seconds" >"$stage/build-seconds"
rm -rf "$out"
mv "$stage" "$out"
echo "build.sh: built $(cat "$out/release") in ${seconds}s" >&2
echo "$out"
