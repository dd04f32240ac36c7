"""Imported at start-up by every Python that scripts/sanitize.sh runs (its PYTHONPATH),
the suite's own subprocesses too: sends UndefinedBehaviorSanitizer's reports to the
log file that UBSAN_OPTIONS' log_path names.

With libasan and libubsan both preloaded, UBSan's log_path is lost: UBSan initialises
at its first report and sets its report path by calling __sanitizer_set_report_path,
which resolves to libasan's copy (first in the search order), so UBSan's own stays
stderr.  Under pytest's fd capture that stderr is a test's captured output, which
halt_on_error's exit then throws away: the run failed with no report anywhere.
Looked up through libubsan's own handle, the call reaches UBSan's copy."""
import ctypes
import os

_path = os.environ.get("IOCPNET_UBSAN_LOG")
_lib = os.environ.get("IOCPNET_UBSAN_LIB")
if _path and _lib:
    ctypes.CDLL(_lib).__sanitizer_set_report_path(os.fsencode(_path))
