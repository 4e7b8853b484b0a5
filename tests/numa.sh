#!/usr/bin/env bash
# NUMA placement checked on two real memory nodes: boots a Linux guest under qemu-system-x86_64
# whose node 0 has the CPUs and 1 GiB and whose node 1 has 1 GiB and no CPU (how CXL memory
# appears to Linux), and runs the core's placement tests inside it (tests/numa.rs with
# `--ignored`, plus the store, slot and mem/kv unit tests), reading the kernel's answer for the
# node of every page. No Python in the guest (kernels/README.md says why).
#
# Installs what it needs from Debian (qemu-system-x86, busybox-static; the kernel image is
# extracted from the linux-image package with apt-get download + dpkg-deb, the host's /boot is
# untouched), builds the test binaries for the host with their shared libraries copied in (the
# same build as `cargo test`, so after tests/run.sh it costs seconds; HYBRIDGEN_NUMA_MUSL=1 builds
# them statically for x86_64-unknown-linux-musl instead: a full build of its own, ~13 min on 2
# busy cores), packs them with busybox and tests/numa/init into an initramfs, boots it and parses
# the serial console.
#
#   bash tests/numa.sh            # ~25 s with packages, kernel and build cached (2 cores, TCG)
#
# Exit status: 0 when every test passed in the guest; non-zero when a test failed or crashed in
# a guest that booted. Where qemu, busybox or the kernel cannot be installed, or the guest does not
# boot in time, it prints "numa: SKIPPED (why)" in a banner and exits 0 - never a silent pass;
# HYBRIDGEN_NUMA_REQUIRED=1 turns a skip into a failure.
# Environment: HYBRIDGEN_NUMA_ACCEL=tcg|kvm (default tcg: nested KVM on cloud VMs may hang at
# boot; TCG boots in ~10 s), HYBRIDGEN_NUMA_BOOT_TIMEOUT (s, default 180) until the guest's init
# starts, HYBRIDGEN_NUMA_TIMEOUT (s, default 600) for the whole guest run, HYBRIDGEN_NUMA_MUSL=1
# for static test binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
work=target/numa
accel=${HYBRIDGEN_NUMA_ACCEL:-tcg}
boot_timeout=${HYBRIDGEN_NUMA_BOOT_TIMEOUT:-180}
run_timeout=${HYBRIDGEN_NUMA_TIMEOUT:-600}
# The tests the guest runs: test target (or "lib"), then libtest arguments.
plan=(
    "numa --ignored"
    "store"
    "slots"
    "lib mem:: kv::"
)

say() { echo "numa: [$((SECONDS - t0)) s] $*"; }

skip() {
    echo "numa: ################################################################"
    echo "numa: SKIPPED ($*)"
    echo "numa: no NUMA placement was verified"
    echo "numa: ################################################################"
    if [ "${HYBRIDGEN_NUMA_REQUIRED:-0}" = 1 ]; then
        exit 1
    fi
    exit 0
}

[ "$(uname -m)" = x86_64 ] || skip "the guest is x86-64; this machine is $(uname -m)"
mkdir -p "$work"

# --- 1. Debian packages ---------------------------------------------------------------------
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
apt_install() {
    command -v apt-get >/dev/null 2>&1 || skip "no apt-get to install $*"
    if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" \
        >"$work/apt.log" 2>&1; then
        { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
            --no-install-recommends "$@"; } >"$work/apt.log" 2>&1 ||
            skip "Debian packages $* could not be installed (see $work/apt.log)"
    fi
}
need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
# The initramfs needs a static busybox (Debian's busybox package is dynamic).
if ! [ -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
    need+=(busybox-static)
fi
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    apt_install "${need[@]}"
fi
say "packages: $(qemu-system-x86_64 --version | head -1), $(/bin/busybox | head -1 | cut -d' ' -f1-2)"

# --- 2. the kernel (Debian's linux-image-amd64, extracted, cached in target/numa) ---------------
kernel=""
if command -v apt-cache >/dev/null 2>&1; then
    # The metapackage names the current image package, e.g. linux-image-6.1.0-57-amd64.
    image=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
    if [ -z "$image" ]; then
        $sudo apt-get update -qq >/dev/null 2>&1 || true
        image=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
    fi
    if [ -n "$image" ]; then
        kernel="$work/vmlinuz-${image#linux-image-}"
        if ! [ -s "$kernel" ]; then
            say "fetching the kernel: apt-get download $image"
            dl="$work/deb"
            rm -rf "$dl" && mkdir -p "$dl"
            if (cd "$dl" && apt-get download "$image" >download.log 2>&1) &&
                dpkg-deb --fsys-tarfile "$dl"/"$image"_*.deb | tar -x -C "$dl" --wildcards './boot/vmlinuz-*'; then
                mv "$dl"/boot/vmlinuz-* "$kernel"
            else
                kernel=""
            fi
            rm -rf "$dl"
        fi
    fi
fi
[ -n "$kernel" ] && [ -s "$kernel" ] || skip "no kernel: linux-image-amd64 could not be downloaded and extracted"
say "kernel: $kernel"

# --- 3. the test binaries ---------------------------------------------------------------------
target=""
if [ "${HYBRIDGEN_NUMA_MUSL:-0}" = 1 ]; then
    target=x86_64-unknown-linux-musl
    rustup target list --installed 2>/dev/null | grep -qx "$target" ||
        rustup target add "$target" >/dev/null 2>&1 || target=""
fi
cargo_args=(test --no-run --no-default-features --message-format=json-render-diagnostics)
[ -n "$target" ] && cargo_args+=(--target "$target")
for entry in "${plan[@]}"; do
    name=${entry%% *}
    if [ "$name" = lib ]; then cargo_args+=(--lib); else cargo_args+=(--test "$name"); fi
done
say "building: cargo ${cargo_args[*]}"
cargo "${cargo_args[@]}" >"$work/build.json"
say "built (${target:-host target, shared libraries copied in})"

root="$work/initramfs"
rm -rf "$root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,tests}
cp /bin/busybox "$root/bin/busybox"
cp tests/numa/init "$root/init"
chmod +x "$root/init"
: >"$root/tests/plan"
# Each test target's executable, from cargo's JSON ("kind":["test"] for tests, ["lib"...] for the lib).
for entry in "${plan[@]}"; do
    name=${entry%% *}
    args=${entry#"$name"}
    target_name=$name
    [ "$name" = lib ] && target_name=hybridgen
    exe=$(grep '"reason":"compiler-artifact"' "$work/build.json" |
        grep "\"name\":\"$target_name\"" | grep '"test":true' |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    [ -n "$exe" ] && [ -x "$exe" ] || { echo "numa: no test executable for $name in cargo's output"; exit 1; }
    cp "$exe" "$root/tests/$name"
    strip "$root/tests/$name" 2>/dev/null || true
    echo "$name$args" >>"$root/tests/plan"
    if [ -z "$target" ]; then
        # glibc build: copy the loader and libraries at the paths ldd names.
        ldd "$exe" | grep -o '/[^ ]*' | while read -r lib; do
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
    fi
done
(cd "$root" && find . | /bin/busybox cpio -o -H newc -R 0:0 2>/dev/null) | gzip -1 >"$work/initramfs.cpio.gz"
say "initramfs: $(du -h "$work/initramfs.cpio.gz" | cut -f1) ($(wc -l <"$root/tests/plan") test binaries)"

# --- 4. boot -------------------------------------------------------------------------------------
case "$accel" in
    kvm) [ -r /dev/kvm ] && [ -w /dev/kvm ] || skip "HYBRIDGEN_NUMA_ACCEL=kvm but /dev/kvm is not usable"
        machine="q35,accel=kvm" ;;
    tcg) machine="q35,accel=tcg" ;;
    *) echo "numa: HYBRIDGEN_NUMA_ACCEL must be tcg or kvm, got $accel"; exit 2 ;;
esac
log="$work/guest.log"
: >"$log"
say "booting the guest ($accel): node 0 = 2 CPUs + 1 GiB, node 1 = 1 GiB, no CPU"
qemu-system-x86_64 -machine "$machine" -m 2G -smp 2 \
    -object memory-backend-ram,id=m0,size=1G -object memory-backend-ram,id=m1,size=1G \
    -numa node,nodeid=0,cpus=0-1,memdev=m0 -numa node,nodeid=1,memdev=m1 \
    -kernel "$kernel" -initrd "$work/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init" \
    -nographic -no-reboot -nic none -serial "file:$log" -monitor none </dev/null >"$work/qemu.log" 2>&1 &
qemu=$!
stop_qemu() { kill "$qemu" 2>/dev/null || true; wait "$qemu" 2>/dev/null || true; }
trap stop_qemu EXIT
shown=0
console="$work/console.txt" # the serial log without carriage returns and terminal escapes
show() { # prints the console lines not shown yet
    local n
    tr -d '\r' <"$log" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g' >"$console"
    n=$(wc -l <"$console")
    if [ "$n" -gt "$shown" ]; then
        sed -n "$((shown + 1)),${n}p" "$console" | sed 's/^/  guest| /'
        shown=$n
    fi
}
started() { grep -q 'numa-guest: started' "$console"; }
boot_start=$SECONDS
booted=""
while kill -0 "$qemu" 2>/dev/null; do
    sleep 1
    show
    if [ -z "$booted" ] && started; then
        booted=$((SECONDS - boot_start))
        say "guest booted in $booted s"
    fi
    if [ -z "$booted" ] && [ $((SECONDS - boot_start)) -ge "$boot_timeout" ]; then
        stop_qemu
        skip "the guest did not boot in $boot_timeout s (qemu $accel; see $log)"
    fi
    if [ $((SECONDS - boot_start)) -ge "$run_timeout" ]; then
        stop_qemu
        show
        echo "numa: FAILED: the guest booted but its tests did not finish in $run_timeout s (see $log)"
        exit 1
    fi
done
wait "$qemu" || true
trap - EXIT
show
if [ -z "$booted" ] && started; then
    booted=$((SECONDS - boot_start))
fi
if [ -z "$booted" ]; then
    skip "qemu exited before the guest booted: $(tail -3 "$work/qemu.log" | tr '\n' ' ')"
fi
result=$(grep -ao 'numa-guest: RESULT .*' "$console" | tail -1)
say "guest ran for $((SECONDS - boot_start)) s"
case "$result" in
    "numa-guest: RESULT PASS"*) echo "numa: PASSED (${result#numa-guest: RESULT PASS }) in $((SECONDS - t0)) s" ;;
    "numa-guest: RESULT FAIL"*) echo "numa: FAILED (${result#numa-guest: RESULT FAIL }), see $log"; exit 1 ;;
    *) echo "numa: FAILED: the guest booted but printed no result line (crash or panic?), see $log"; exit 1 ;;
esac
