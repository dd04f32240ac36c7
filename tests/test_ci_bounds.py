"""scripts/test.sh's wall-clock bounds (scripts/ci_bound.sh): a step over its bound is
killed with everything it started and says so; a lane's watchdog kills the lane's tree,
writes why into the lane's log, and ends at once when told (the lane ended first)."""
import os
import signal
import subprocess
import time

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "scripts", "ci_bound.sh")
if not os.path.exists(SCRIPT):       # the sdist ships tests/ without scripts/
    pytest.skip("scripts/ci_bound.sh is not here", allow_module_level=True)

# A command with a child that would outlive it: its pid in the file "child".
TREE = "bash -c 'sleep 60 & echo $! > child; wait'"


def run(tmp_path, body):
    """body in bash with ci_bound.sh sourced and bound_s[t]=1; a session of its own, all
    of it killed if it hangs."""
    # Without the sanitizer runtimes the ASan run preloads (scripts/sanitize.sh): under
    # them ps fails, and kill_tree finds no children.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    proc = subprocess.Popen(
        ["bash", "-c", f"set -euo pipefail; source {SCRIPT}; declare -A bound_s=([t]=1)\n"
                       + body],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env=env)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # strays of a failed case (a success has none)
        except ProcessLookupError:
            pass
        proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pid, timeout=20):
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive"
        time.sleep(0.05)


def test_a_step_over_its_bound_is_killed_with_its_children_and_says_so(tmp_path):
    out = run(tmp_path, f'rc=0; bound t "step t" {TREE} || rc=$?; echo "rc=$rc"')
    assert out.stdout.strip() == "rc=124", out            # timeout's status
    assert "test.sh: step t exceeded 2 s: killed" in out.stderr, out.stderr
    wait_dead(int((tmp_path / "child").read_text()))


def test_a_step_within_its_bound_keeps_its_status_and_says_nothing(tmp_path):
    out = run(tmp_path, 'rc=0; bound t "step t" bash -c "exit 3" || rc=$?; echo "rc=$rc"')
    assert out.stdout.strip() == "rc=3", out
    assert "exceeded" not in out.stderr, out.stderr


def test_a_lane_over_its_bound_is_killed_and_its_log_says_why(tmp_path):
    out = run(tmp_path, f"""
        {TREE} & lane=$!
        watchdog 1 "lane x" $lane lane.log & dog=$!
        rc=0; wait $lane || rc=$?
        kill $dog; wait $dog || true      # what wait_lanes does once a lane has ended
        echo "rc=$rc"
    """)
    assert out.stdout.strip() == "rc=143", out            # the lane got SIGTERM
    assert "test.sh: lane x exceeded 1 s: killed" in (tmp_path / "lane.log").read_text()
    assert "test.sh: lane x exceeded 1 s: killed" in out.stderr
    wait_dead(int((tmp_path / "child").read_text()))


def test_a_watchdog_told_to_stop_ends_at_once(tmp_path):
    """Told to stop in its 30 s between SIGTERM and SIGKILL, or before its bound: it
    ends, not 30 s later (when the lane's pid may be another process's)."""
    # (bound, pause before the TERM, lane): in the grace (the lane ignores SIGTERM), before
    for bound, pause, lane in ((1, 2, "bash -c 'trap \"\" TERM; exec sleep 60'"),
                               (600, 0.5, "sleep 60")):
        out = run(tmp_path, f"""
            {lane} & lane=$!
            watchdog {bound} "lane x" $lane lane.log & dog=$!
            echo $lane > lane.pid
            sleep {pause}
            start=$SECONDS; kill $dog; wait $dog || true
            echo "waited=$((SECONDS - start))"
            kill -KILL $lane
        """)
        waited = int(out.stdout.strip().removeprefix("waited="))
        assert waited < 20, (bound, out)                  # not the 30 s grace
        wait_dead(int((tmp_path / "lane.pid").read_text()))


def test_end_all_ends_the_listed_groups_and_the_children_and_no_stranger(tmp_path):
    """test.sh's stop and cleanup: a listed group whose leader is gone (a server that
    outlived its step's command) and this shell's own child end; a listed group number
    that is another session's (the step's group emptied, its number taken since) is left
    alone."""
    out = run(tmp_path, """
        timeout 60 sh -c 'sleep 60 & echo $! > orphan' & step=$!
        wait $step
        sleep 60 & echo $! > child
        (setsid sleep 60 >/dev/null 2>&1 & echo $! > stranger)   # not ours
        printf '%s step 5\\n%s step 7\\n' $step $(cat stranger) > groups
        sleep 0.2
        end_all TERM groups
        echo done
    """)
    assert out.stdout.strip() == "done", out
    try:
        wait_dead(int((tmp_path / "orphan").read_text()))
        wait_dead(int((tmp_path / "child").read_text()))
        assert alive(int((tmp_path / "stranger").read_text()))
    finally:
        os.kill(int((tmp_path / "stranger").read_text()), signal.SIGKILL)
