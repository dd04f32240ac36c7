#!/usr/bin/env bash
# cibuildwheel's before-all on Linux (it runs once inside each manylinux container, before
# any wheel is built): make sure the kernel UAPI headers can compile port/io_uring.c.
#
#   bash scripts/cibw_linux_headers.sh PROJECT_DIR
#
# Why: io_uring.c talks to the kernel through <linux/io_uring.h> and raw system calls
# (nothing to link), and it uses the provided-buffer ring and recv flags of Linux 5.19 and
# 6.0.  The wheel runs wherever the running kernel has them (and falls back to epoll
# elsewhere), but the *build* needs a header that declares them, and the manylinux
# images carry their distribution's kernel headers: 3.10 in manylinux2014 (no io_uring.h
# at all), and RHEL 8's 4.18 in manylinux_2_28, older than what io_uring.c needs.  The
# headers only give constants and struct layouts, and the kernel keeps that ABI stable,
# so building against newer headers than the oldest supported kernel is safe: the core
# probes the running kernel at start (IORING_REGISTER_PROBE) anyway.
#
# So: try to compile io_uring.c with the image's headers.  If that fails, install the
# UAPI headers of a pinned upstream kernel into $PREFIX (make headers_install), and the
# build finds them through CPATH (set in [tool.cibuildwheel.linux] environment).  The
# result is checked by compiling io_uring.c again, so a header problem fails here, with
# a clear message, and never produces a wheel without io_uring.
#
# Environment: IOCPNET_UAPI_PREFIX (default /opt/linux-uapi, must match CPATH),
# IOCPNET_KERNEL_VERSION (default below), IOCPNET_KERNEL_TARBALL (a local linux-*.tar.*
# to use instead of downloading; for testing this script).
set -euo pipefail

project=${1:?usage: cibw_linux_headers.sh PROJECT_DIR}
prefix=${IOCPNET_UAPI_PREFIX:-/opt/linux-uapi}
# An LTS release whose UAPI has everything io_uring.c uses; the base tarball of a
# release stays on kernel.org for good (point releases are pruned).
kver=${IOCPNET_KERNEL_VERSION:-6.6}

# The check is the real thing: compile io_uring.c as setup.py does (Linux branch).
compiles() {
    CPATH="$prefix/include${CPATH:+:$CPATH}" \
        gcc -fsyntax-only -D_GNU_SOURCE -DPORT_HAVE_IO_URING=1 -DPORT_HAVE_EPOLL=1 \
        -I"$project/src/iocpnet" "$project"/src/iocpnet/port/io_uring*.c
}

mkdir -p "$prefix/include"      # CPATH points here either way
if compiles 2>/dev/null; then
    echo "cibw_linux_headers: the image's kernel headers compile io_uring.c; nothing to do"
    exit 0
fi
echo "cibw_linux_headers: the image's kernel headers are too old for io_uring.c:"
compiles 2>&1 | grep -m 5 -E "error|fatal" || true

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -n "${IOCPNET_KERNEL_TARBALL:-}" ]; then
    tarball=$IOCPNET_KERNEL_TARBALL
else
    major=${kver%%.*}
    base="https://cdn.kernel.org/pub/linux/kernel/v${major}.x"
    tarball="$work/linux-$kver.tar.xz"
    echo "cibw_linux_headers: downloading Linux $kver to install its UAPI headers"
    curl -fsSL --retry 3 -o "$tarball" "$base/linux-$kver.tar.xz"
    curl -fsSL --retry 3 -o "$work/sha256sums.asc" "$base/sha256sums.asc"
    # kernel.org's checksum list for the directory: catches a truncated or altered
    # download (the transfer itself is HTTPS).
    want=$(awk -v f="linux-$kver.tar.xz" '$2 == f { print $1 }' "$work/sha256sums.asc")
    [ -n "$want" ] || { echo "no checksum for linux-$kver.tar.xz" >&2; exit 1; }
    echo "$want  $tarball" | sha256sum -c -
fi

# headers_install needs make, a host compiler (for unifdef) and rsync.
if ! command -v rsync >/dev/null || ! command -v make >/dev/null; then
    if command -v dnf >/dev/null; then dnf install -y -q rsync make
    elif command -v yum >/dev/null; then yum install -y -q rsync make
    elif command -v apt-get >/dev/null; then apt-get update -qq && apt-get install -y -qq rsync make
    elif command -v apk >/dev/null; then apk add --no-cache rsync make
    fi
fi

tar -xf "$tarball" -C "$work"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'linux*' | head -n 1)
case "$(uname -m)" in
    x86_64|i?86) karch=x86 ;;
    aarch64|arm64) karch=arm64 ;;
    armv7*|armv6*) karch=arm ;;
    ppc64*) karch=powerpc ;;
    s390x) karch=s390 ;;
    riscv64) karch=riscv ;;
    *) echo "cibw_linux_headers: unknown machine $(uname -m)" >&2; exit 1 ;;
esac
make -s -C "$src" ARCH="$karch" INSTALL_HDR_PATH="$prefix" headers_install

if ! compiles; then
    echo "cibw_linux_headers: io_uring.c still does not compile with the headers of" \
         "$(basename "$src") in $prefix" >&2
    exit 1
fi
echo "cibw_linux_headers: UAPI headers of $(basename "$src") installed in $prefix/include"
