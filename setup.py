"""Build iocpnet's extension: the Cython core plus the C port layer for this platform.

Environment:
  IOCPNET_SANITIZE=1   build with AddressSanitizer + UndefinedBehaviorSanitizer (tests)
  IOCPNET_DEBUG=1      no optimisation, debug symbols, Cython line tracing off
"""
import os
import sys

from setuptools import Extension, setup

PORT = "src/iocpnet/port"
# The port's sources (tests/c/run_contract.sh lists the same): what every backend links,
# then the platform's socket helpers and each backend's own files.
PORT_COMMON = ["common.c", "strand.c", "bufpool.c", "addr.c"]
IO_URING = ["io_uring.c", "io_uring_setup.c", "io_uring_bufs.c"]

if sys.platform == "win32":
    # Windows: the real IOCP backend.
    port_sources = PORT_COMMON + ["win_sock.c", "iocp.c"]
    macros = [("PORT_HAVE_IOCP", "1"), ("WIN32_LEAN_AND_MEAN", "1"),
              ("_WIN32_WINNT", "0x0601")]
    libraries = ["ws2_32", "mswsock"]
    extra_compile_args = []
    extra_link_args = []
elif sys.platform.startswith("linux"):
    # Linux: io_uring first, epoll where io_uring is blocked or missing.
    port_sources = PORT_COMMON + ["posix_sock.c"] + IO_URING + ["epoll.c", "epoll_ops.c"]
    macros = [("PORT_HAVE_IO_URING", "1"), ("PORT_HAVE_EPOLL", "1"), ("_GNU_SOURCE", "1")]
    libraries = []
    # -fvisibility=hidden: the port's functions are called only from inside this one
    # extension; exported, every call between its files went through the PLT (a jump
    # through the GOT each). Only PyInit__core (PyMODINIT_FUNC) stays exported.
    extra_compile_args = ["-O2", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function",
                          "-fvisibility=hidden"]
    extra_link_args = []
else:
    raise SystemExit(f"iocpnet: no completion-port backend for {sys.platform} yet "
                     f"(Linux: io_uring/epoll, Windows: IOCP)")

port_sources = [f"{PORT}/{name}" for name in port_sources]


def io_uring_headers_ok():
    """Can this system's <linux/io_uring.h> compile the io_uring backend?  io_uring_int.h
    defines itself what came after Linux 5.13, so only older headers fail.  The test is
    the backend's own files, with the build's flags."""
    import shlex
    import subprocess
    import sysconfig
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    cmd = cc + ["-fsyntax-only", "-Isrc/iocpnet"] + \
        [f"-D{k}={v}" for k, v in macros] + [f"{PORT}/{name}" for name in IO_URING]
    try:
        return subprocess.run(cmd, capture_output=True).returncode == 0
    except OSError:
        return True          # no compiler to ask: let the build itself say what is wrong


# With kernel headers too old for io_uring.c, build epoll only rather than fail: the
# package still works everywhere (epoll is the fallback anyway).
# IOCPNET_REQUIRE_IO_URING=1 (set for the published wheels) makes that an error.
if f"{PORT}/io_uring.c" in port_sources and not io_uring_headers_ok():
    if os.environ.get("IOCPNET_REQUIRE_IO_URING"):
        raise SystemExit("iocpnet: <linux/io_uring.h> is too old for port/io_uring.c "
                         "(Linux 5.13 UAPI headers needed)")
    print("iocpnet: <linux/io_uring.h> is older than Linux 5.13: building without the "
          "io_uring backend (epoll only)", file=sys.stderr)
    port_sources = [p for p in port_sources if p not in {f"{PORT}/{n}" for n in IO_URING}]
    macros = [m for m in macros if m[0] != "PORT_HAVE_IO_URING"]

if os.environ.get("IOCPNET_SANITIZE") and sys.platform != "win32":
    flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1"]
    extra_compile_args = [a for a in extra_compile_args if not a.startswith("-O")] + flags
    extra_link_args += ["-fsanitize=address,undefined"]
if os.environ.get("IOCPNET_DEBUG") and sys.platform != "win32":
    extra_compile_args = [a for a in extra_compile_args if not a.startswith("-O")] + ["-O0", "-g"]

extensions = [
    Extension(
        "iocpnet._core",
        sources=["src/iocpnet/_core.pyx"] + port_sources,
        include_dirs=["src/iocpnet"],
        define_macros=macros,
        libraries=libraries,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )
]


def cythonize(exts):
    from Cython.Build import cythonize as _cythonize
    return _cythonize(
        exts,
        compiler_directives={"language_level": "3", "embedsignature": True},
        quiet=True,
    )


setup(ext_modules=cythonize(extensions))
