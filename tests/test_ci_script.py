"""scripts/test.sh itself, run with a stand-in for python (it records how it is called,
builds nothing, and its pytest or build fails when told): what reaches pytest, what a
failed background build says, what a run leaves behind.  Seconds, not the real CI."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "test.sh")
if not os.path.exists(SCRIPT) or not os.path.isdir(os.path.join(ROOT, ".git")) \
        and not os.path.isfile(os.path.join(ROOT, ".git")):
    pytest.skip("not a git checkout with scripts/test.sh", allow_module_level=True)

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite \
name="pytest" errors="1" failures="1" skipped="1" tests="3" time="2.5">\
<testcase classname="tests.test_cli" name="test_chat[io_uring]" time="1.2">\
<failure message="assert 78239 &gt;= (2 * 40672)">the traceback</failure></testcase>\
<testcase classname="tests.test_cli" name="test_chat[io_uring]" time="0.0">\
<error message="failed on teardown with &quot;AssertionError: leaked: before the test \
{'cores_alive': 0}, after {'cores_alive': 1}&#10;assert {'cores_alive': 1} == \
{'cores_alive': 0}&quot;">the traceback</error></testcase>\
<testcase classname="tests.test_cli" name="test_chat[epoll]" time="1.1" />\
<testcase classname="tests.test_cli" name="test_other" time="0.0">\
<skipped type="pytest.skip" message="not here">why</skipped></testcase>\
</testsuite></testsuites>"""


STUB = f"""#!{sys.executable}
# A stand-in for python in scripts/test.sh.
import json, os, sys
args = sys.argv[1:]
# A failed suite's report, as pytest --junitxml writes it (a failure, its teardown's
# error, a pass, a skip).
JUNIT = {JUNIT!r}


def hang(what):
    # A step that runs until stopped: a child, and a server that outlived the shell that
    # started it (its parent is gone: only its process group holds it), as pytest's
    # xdist workers and the tests' servers; then it says where it is.
    import subprocess, time
    subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 &"])
    ready = os.path.join(os.environ["STUB_READY"], what)
    with open(ready + ".tmp", "w") as f:
        f.write(str(os.getpgrp()))
    os.rename(ready + ".tmp", ready)
    time.sleep(300)


with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"cwd": os.getcwd(), "args": args}}) + "\\n")
if args[:1] == ["-"] or args[0].endswith("/ci_failures.py"):     # the real interpreter
    os.execv({sys.executable!r}, [{sys.executable!r}] + args)
if args[:2] == ["-m", "venv"]:
    os.makedirs(os.path.join(args[2], "bin"))
    os.symlink(os.path.abspath(__file__), os.path.join(args[2], "bin", "python"))
elif args[:2] == ["-m", "build"]:
    if "build" in os.environ.get("STUB_HANG", "").split():
        hang("build")
    out = args[args.index("--outdir") + 1]
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "iocpnet-0-py3-none-any.whl"), "w").close()
elif args[:2] == ["-m", "pytest"]:
    if os.environ.get("STUB_WAIT_FOR"):      # until that hanging command has started
        import time
        while not os.path.exists(os.path.join(os.environ["STUB_READY"],
                                              os.environ["STUB_WAIT_FOR"])):
            time.sleep(0.05)
    if "pytest" in os.environ.get("STUB_HANG", "").split():
        hang("pytest")
    if os.environ.get("STUB_BUILD_AFTER_PYTEST"):
        open(os.path.join(os.environ["STUB_READY"], "pytest"), "w").close()
    junit = [a.split("=", 1)[1] for a in args if a.startswith("--junitxml=")]
    if os.environ.get("STUB_PYTEST_RC", "0") != "0" and junit:
        with open(junit[-1], "w") as f:
            f.write(JUNIT)
    if os.environ.get("STUB_SCRATCH_LOG"):  # a log that a failing step left in scratch
        scratch = [d for d in os.listdir(os.environ["TMPDIR"]) if d.startswith("iocpnet-ci.")]
        os.makedirs(os.path.join(os.environ["TMPDIR"], scratch[0], "step"))
        with open(os.path.join(os.environ["TMPDIR"], scratch[0], "step", "what.log"), "w") as f:
            f.write("why it failed\\n")
    sys.exit(int(os.environ.get("STUB_PYTEST_RC", "0")))
elif args[:1] == ["setup.py"]:              # scripts/devbuild.sh's build
    if "setup" in os.environ.get("STUB_HANG", "").split():
        hang("setup")
    if os.environ.get("STUB_BUILD_AFTER_PYTEST"):   # succeeds, 2 s after pytest started
        import time
        while not os.path.exists(os.path.join(os.environ["STUB_READY"], "pytest")):
            time.sleep(0.05)
        time.sleep(2)
        sys.exit(0)
    print("the build failed here", file=sys.stderr)
    sys.exit(1)
"""


def env_for_test_sh(tmp_path, skip, **env):
    """test.sh's command line and environment with the stand-in python; the steps in
    `skip` skipped (3 and 5 always run)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python3"
    stub.write_text(STUB)
    stub.chmod(0o755)
    # The tools test.sh would install with apt-get when missing (as root): present.
    for tool in ("redis-server", "openssl", "chromium"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "tmp").mkdir()
    log = tmp_path / "calls.jsonl"
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("IOCPNET_") and k != "LD_PRELOAD"}
    environ.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(stub),
                   TMPDIR=str(tmp_path / "tmp"), IOCPNET_TEST_DIR=str(tmp_path / "out"),
                   IOCPNET_SKIP=skip, STUB_LOG=str(log), **env)
    return environ


def run_test_sh(tmp_path, *pytest_args, skip, **env):
    """test.sh in sequential mode with the stand-in python.  Returns (the finished
    process, the stand-in's calls)."""
    environ = env_for_test_sh(tmp_path, skip, **env)
    proc = subprocess.run(["bash", SCRIPT, *pytest_args], env=environ, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    log = tmp_path / "calls.jsonl"
    calls = [json.loads(line)["args"] for line in log.read_text().splitlines()]
    return proc, calls


def pytest_calls(calls):
    return [c for c in calls if c[:2] == ["-m", "pytest"]]


def marker_expression(args):
    """The -m expression pytest applies (the last one given), or None."""
    expr = None
    for i, a in enumerate(args):
        if a == "-m":
            expr = args[i + 1]
        elif a.startswith("-m") and not a.startswith("--"):
            expr = a[2:]
    return expr


def test_a_failed_background_build_fails_its_step_with_its_log_and_has_its_own_line(tmp_path):
    """Step 7's build runs in the background from step 3 on; it failed: step 7 says so
    with the end of the build's log, the run fails, and the table gives the build a line
    of its own (its CPU is not charged to whichever step ran when it ended)."""
    proc, calls = run_test_sh(tmp_path, skip="contract fuzz dist types freethreaded")
    assert proc.returncode == 1, proc.stderr
    assert "the build failed here" in proc.stderr, proc.stderr
    log = tmp_path / "out" / "bg-7.log"
    assert f"test.sh: the ASan + UBSan build failed (log: {log})" in proc.stderr, proc.stderr
    table = proc.stderr.split("== time per step")[1]
    assert "7. (in the background) the ASan + UBSan build (FAILED)" in table, table
    assert "7. the suite against an ASan + UBSan build (io_uring) (FAILED)" in table, table
    assert len(pytest_calls(calls)) == 1, calls          # step 5's: step 7 never ran pytest


@pytest.mark.parametrize("given", [["-m", "slow or fast"], ["-mslow or fast"]])
def test_a_users_marker_expression_is_combined_with_the_skipped_machine_state(tmp_path, given):
    """IOCPNET_SKIP=machine_state adds -m "not machine_state"; a user's own -m (pytest
    keeps the last) used to replace it, and the machine_state tests ran after all."""
    proc, calls = run_test_sh(tmp_path, "-x", *given,
                              skip="contract fuzz dist types sanitize freethreaded machine_state")
    assert proc.returncode == 0, proc.stderr
    (step5,) = pytest_calls(calls)
    assert marker_expression(step5) == "(slow or fast) and not machine_state", step5
    assert "-x" in step5, step5


def test_without_a_users_marker_the_skipped_machine_state_is_the_expression(tmp_path):
    proc, calls = run_test_sh(tmp_path, "-x",
                              skip="contract fuzz dist types sanitize freethreaded machine_state")
    assert proc.returncode == 0, proc.stderr
    (step5,) = pytest_calls(calls)
    assert marker_expression(step5) == "not machine_state", step5
    assert step5[2:].count("-m") == 1, step5          # (after "-m pytest")
    assert proc.stderr.endswith("  in all\n\nall tests passed\n"), proc.stderr  # no report


def scratch_dirs(tmp_path):
    return [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("iocpnet-ci.")]


def test_a_failed_run_leaves_no_scratch_directory_but_keeps_its_logs(tmp_path):
    """A failed step (step 5 here) that left a log in the scratch directory: the
    directory is removed, the log is kept in the work directory and the output says
    where (check_dist.sh names its logs there)."""
    proc, _ = run_test_sh(tmp_path, skip="contract fuzz dist types sanitize freethreaded",
                          STUB_PYTEST_RC="1", STUB_SCRATCH_LOG="1")
    assert proc.returncode == 1, proc.stderr
    assert scratch_dirs(tmp_path) == [], proc.stderr
    kept = tmp_path / "out" / "scratch-logs"
    assert (kept / "step" / "what.log").read_text() == "why it failed\n"
    assert f"its logs (named above) are kept in {kept}" in proc.stderr, proc.stderr



def group_members(pgid):
    """The live processes of process group pgid (zombies are ended: not counted)."""
    members = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(pid))
    return members


def end_groups(pgids):
    for pgid in pgids:
        for pid in group_members(pgid):
            os.kill(pid, signal.SIGKILL)


STEP_5 = "step 5. pytest against the installed package"


@pytest.mark.parametrize("sig, to_group, hang, parallel, running", [
    (signal.SIGTERM, False, "pytest setup", "0",
     f"{STEP_5}; step 7's background build (the ASan + UBSan build)"),
    (signal.SIGINT, True, "pytest", "0", STEP_5),
    (signal.SIGTERM, False, "build", "0", "step 3. the sdist and a wheel built from it"),
    (signal.SIGTERM, False, "pytest", "1", f"lane wheel (at {STEP_5}; log: "),
], ids=["TERM-step5", "Ctrl-C-step5", "TERM-step3", "TERM-lane"])
def test_a_signal_stops_the_running_step_and_everything_it_started(tmp_path, sig, to_group,
                                                                   hang, parallel, running):
    """CI's kill at its time limit (SIGTERM to test.sh) or a Ctrl-C (SIGINT to the
    terminal's foreground process group: test.sh and what runs in its group) while a step
    runs (and step 7's background build, in the first case; in a lane, in the last): the
    process group of each ends at once (its child, and a server whose parent is gone), the
    scratch directory goes, the output says what was running, and the run fails."""
    ready = tmp_path / "ready"
    ready.mkdir()
    hanging = hang.split()
    skip = "contract fuzz dist types freethreaded" + ("" if "setup" in hanging else " sanitize")
    environ = env_for_test_sh(tmp_path, skip, STUB_HANG=hang, STUB_READY=str(ready),
                              IOCPNET_PARALLEL=parallel)
    proc = subprocess.Popen(["bash", SCRIPT], env=environ, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    pgids = []
    try:
        deadline = time.monotonic() + 60
        while len(pgids) < len(hanging):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"the stand-in's {hang} never started"
            pgids = [int((ready / what).read_text()) for what in hanging
                     if (ready / what).exists()]
            time.sleep(0.05)
        assert all(group_members(pgid) for pgid in pgids), "not running"
        stopped_at = time.monotonic()
        if to_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(timeout=30)
        took = time.monotonic() - stopped_at
        left = [group_members(pgid) for pgid in pgids]
        end_groups(pgids)                   # (a failed case's: they hold test.sh's output)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode != 0, err
        assert left == [[]] * len(pgids), err
        assert scratch_dirs(tmp_path) == [], err
        assert f"test.sh: {sig.name} during {running}" in err, err
        assert took < 15, (took, err)
    finally:
        end_groups(pgids)
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # test.sh, or what is left of its group
        except ProcessLookupError:
            pass
        proc.communicate()


def test_a_failed_run_ends_the_background_build_it_no_longer_needs(tmp_path):
    """Step 5 fails while step 7's build runs in the background: the run stops there, and
    so does the build (its whole process group)."""
    ready = tmp_path / "ready"
    ready.mkdir()
    try:
        proc, _ = run_test_sh(tmp_path, skip="contract fuzz dist types freethreaded",
                              STUB_PYTEST_RC="1", STUB_HANG="setup", STUB_READY=str(ready),
                              STUB_WAIT_FOR="setup")
        assert proc.returncode == 1, proc.stderr
        assert group_members(int((ready / "setup").read_text())) == [], proc.stderr
    finally:
        if (ready / "setup").exists():
            end_groups([int((ready / "setup").read_text())])


def test_a_failed_suite_ends_the_output_with_what_failed_where_and_on_which_build(tmp_path):
    """What CI shows last of a failed run: below the table, the commit, the failed step,
    the build it tested and a line per failed test (its own teardown's error beside it,
    not as a second test), with the backends the failures were on."""
    proc, _ = run_test_sh(tmp_path, skip="contract fuzz dist types sanitize freethreaded",
                          STUB_PYTEST_RC="1")
    assert proc.returncode == 1, proc.stderr
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    end = proc.stderr.split("  in all\n", 1)[1].strip().splitlines()
    assert end and end[0].startswith(f"== FAILED at {head}"), proc.stderr
    venv = tmp_path / "out" / "venv-python3"
    report = tmp_path / "out" / "junit-5.xml"
    assert end[1:] == [
        "step 5. pytest against the installed package",
        f"  build: the wheel iocpnet-0-py3-none-any.whl, installed in {venv}",
        f"  pytest: 1 failed, 1 error (on io_uring); 1 passed, 1 skipped (the report: {report})",
        "  FAILED tests/test_cli.py::test_chat[io_uring] - assert 78239 >= (2 * 40672)",
        "      and at its teardown: AssertionError: leaked: before the test"
        " {'cores_alive': 0}, after {'cores_alive': 1}",
    ], proc.stderr


def test_a_step_held_up_by_its_background_build_says_how_long_in_the_table(tmp_path):
    """Step 7 waits for its build (which ends 2 s after step 5's pytest started): its line
    in the table says for how long, so that a run shows what the build's low priority
    cost it."""
    ready = tmp_path / "ready"
    ready.mkdir()
    proc, _ = run_test_sh(tmp_path, skip="contract fuzz dist types freethreaded",
                          STUB_BUILD_AFTER_PYTEST="1", STUB_READY=str(ready))
    table = proc.stderr.split("== time per step")[1]
    waited = re.search(r"7\. the suite against an ASan \+ UBSan build \(io_uring\) "
                       r"\(waited (\d+) s for the ASan \+ UBSan build\)", table)
    assert waited and int(waited.group(1)) >= 1, proc.stderr
