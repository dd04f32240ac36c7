"""Build iocpnet's extension: the Cython core plus the C port layer for this platform.

Environment:
  IOCPNET_SANITIZE=1   build with AddressSanitizer + UndefinedBehaviorSanitizer (tests)
  IOCPNET_DEBUG=1      no optimisation, debug symbols, Cython line tracing off
"""
import os
import sys

from setuptools import Extension, setup

PORT = "src/iocpnet/port"

if sys.platform == "win32":
    # Windows: the real IOCP backend.
    port_sources = ["common.c", "win_sock.c", "iocp.c"]
    macros = [("PORT_HAVE_IOCP", "1"), ("WIN32_LEAN_AND_MEAN", "1"),
              ("_WIN32_WINNT", "0x0601")]
    libraries = ["ws2_32", "mswsock"]
    extra_compile_args = []
    extra_link_args = []
elif sys.platform.startswith("linux"):
    # Linux: io_uring first, epoll where io_uring is blocked or missing.
    port_sources = ["common.c", "posix_sock.c", "io_uring.c", "epoll.c"]
    macros = [("PORT_HAVE_IO_URING", "1"), ("PORT_HAVE_EPOLL", "1"), ("_GNU_SOURCE", "1")]
    libraries = []
    extra_compile_args = ["-O2", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function"]
    extra_link_args = []
else:
    raise SystemExit(f"iocpnet: no completion-port backend for {sys.platform} yet "
                     f"(Linux: io_uring/epoll, Windows: IOCP)")

# Keep only the port files that exist, so a checkout without a backend in progress
# still builds the others; common.c refuses to build with no backend at all.
port_sources = [f"{PORT}/{name}" for name in port_sources if os.path.exists(f"{PORT}/{name}")]
if sys.platform.startswith("linux") and f"{PORT}/epoll.c" not in port_sources:
    macros = [m for m in macros if m[0] != "PORT_HAVE_EPOLL"]

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
