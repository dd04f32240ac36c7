#!/usr/bin/env python3
"""Unit tests of the report's rules in benchmarks/run.py: what limited a cell,
which cells compare servers, and when a difference is within the noise.

These rules decide what docs/benchmarks.md claims, so each one is pinned here
on synthetic slices (no server, no load generator, no timing): a change to a
rule that does not change its test fails.

    python3 -m pytest benchmarks/test_rules.py -q      (a second; also run by
    python3 benchmarks/test_rules.py                     benchmarks/selftest.py)
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402


def sl(rnd, rate, cpu_us, busy=0.5, window=1.0, sched=None, disturbed=None, lg_us=None):
    """One slice: rate round trips/s, cpu_us server µs per round trip; lg_us
    sets the load generator's busy share so that it spent lg_us per round trip."""
    n = int(rate * window)
    if lg_us is not None:
        busy = lg_us * n / 1e6 / window
    s = {"round": rnd, "rt_per_s": rate, "roundtrips": n, "window_s": window,
         "server_cpu_s": cpu_us * n / 1e6, "loadgen_busy": busy, "loadgen_cpu_s": window,
         "other_load_cores": 0.0, "disturbed": disturbed}
    if sched is not None:
        s["sched"] = sched
    return s


def sched(offered, late=0, lost_late=0.0, lost_full=0.0, deferred=None):
    s = {"offered": offered, "starts": offered, "waited": offered // 2, "late": late,
         "late_over_us": 100, "lag_us_mean": 5.0, "lost_late": lost_late,
         "lost_full": lost_full}
    if deferred is not None:  # offered in bursts (loadgen -b)
        s.update(burst_us=1000.0, deferred=deferred)
    return s


def agg_of(case, slices_by_server):
    record = {k: {"status": "ok", "error": None, "slices": v}
              for k, v in slices_by_server.items()}
    run.aggregate(case, record)
    return record


CAPPED = run.Case("pl-at1M", "pipeline", 64, 100, depth=16, rate=1_000_000)


def capped_slices(rate=995_000, cpu_us=0.8, busy=1.0, late=0, lost_late=0.0, with_sched=True,
                  deferred=None):
    cores_cpu = cpu_us
    return [sl(r, rate, cores_cpu, busy=busy,
               sched=sched(1_000_000, late, lost_late, deferred=deferred) if with_sched else None)
            for r in range(4)]


# ---- capped (equal-rate) cells: the schedule rule, not the busy share ----

def test_capped_cell_with_a_100_percent_busy_generator_that_held_its_schedule_compares():
    a = agg_of(CAPPED, {"x": capped_slices(busy=1.0)})["x"]["agg"]
    assert a["limited_by"] == "the offered rate"
    assert a["excluded"] is None
    assert a["does_not_compare_servers"] is False
    assert a["schedule"]["miss"] == 0


def test_capped_cell_whose_generator_fell_behind_its_schedule_is_load_generator_limited():
    # 3 % of the starts late (over 100 µs) or dropped while a sender waited
    a = agg_of(CAPPED, {"x": capped_slices(late=20_000, lost_late=10_000)})["x"]["agg"]
    assert a["limited_by"] == "load generator"
    assert a["does_not_compare_servers"] is True
    assert "behind its schedule" in a["excluded"]


def test_capped_schedule_miss_at_the_threshold_still_compares():
    a = agg_of(CAPPED, {"x": capped_slices(late=15_000, lost_late=5_000)})["x"]["agg"]
    assert a["schedule"]["miss"] == run.SCHED_MISS_MAX
    assert a["excluded"] is None


def test_capped_cell_below_the_offered_rate_is_the_servers_limit():
    a = agg_of(CAPPED, {"x": capped_slices(rate=900_000, cpu_us=0.9, busy=0.8)})["x"]["agg"]
    assert a["limited_by"] == "server (below the offered rate)"
    assert a["does_not_compare_servers"] is False
    assert a["excluded"] == "kept 90% of the offered rate"


def test_capped_cell_below_the_rate_with_a_busy_generator_blames_neither_and_is_marked():
    a = agg_of(CAPPED, {"x": capped_slices(rate=900_000, cpu_us=0.9, busy=0.99)})["x"]["agg"]
    assert a["limited_by"] == "load generator"
    assert a["does_not_compare_servers"] is True
    assert "either side" in a["excluded"]


def test_capped_cell_with_a_saturated_server_is_in_no_ratio():
    # 995k/s at 0.97 µs: 0.965 cores
    a = agg_of(CAPPED, {"x": capped_slices(cpu_us=0.97)})["x"]["agg"]
    assert a["server_cores"] >= run.CAPPED_SATURATED
    assert a["limited_by"] == "server (saturated at the offered rate)"
    assert "saturated" in a["excluded"]


def test_capped_cell_saved_before_the_schedule_figures_keeps_the_busy_rule():
    a = agg_of(CAPPED, {"x": capped_slices(busy=1.0, with_sched=False)})["x"]["agg"]
    assert a["limited_by"] == "load generator"
    a = agg_of(CAPPED, {"x": capped_slices(busy=0.5, with_sched=False)})["x"]["agg"]
    assert a["limited_by"] == "the offered rate"


def test_capped_pair_ratio_exists_only_between_cells_that_compare():
    rec = agg_of(CAPPED, {"x": capped_slices(cpu_us=0.8), "y": capped_slices(cpu_us=0.88),
                          "z": capped_slices(late=50_000)})
    v = rec["x"]["agg"]["vs"]
    assert abs(v["y"]["cpu"] - 1.1) < 1e-9
    assert v["y"]["cpu_verdict"]["verdict"] == "ahead"
    assert v["z"]["cpu"] is None and v["z"]["excluded"].startswith("peer: load generator")


# ---- capped cells offered in bursts (loadgen -b) ----

BURST = run.Case("pl-at1M-b", "pipeline", 64, 100, depth=16, rate=1_000_000, burst_us=1000)


def test_burst_cell_passes_its_tick_to_the_load_generator_and_says_so():
    r = type("R", (), {"port": 1, "pid": 2})()
    args = type("A", (), {"warmup": 1, "slice": 2, "engine": None})()
    argv = run.slice_argv(BURST, r, args)
    assert argv[argv.index("-r") + 1] == "1000000" and argv[argv.index("-b") + 1] == "1000"
    assert "-b" not in run.slice_argv(CAPPED, r, args)
    assert BURST.label.endswith("at 1M/s in 1 ms bursts")
    assert run.Case(**{k: v for k, v in BURST.to_json().items() if k != "label"}).burst_us == 1000


def test_burst_cell_that_kept_its_bursts_compares_and_reports_the_deferred_share():
    a = agg_of(BURST, {"x": capped_slices(deferred=20_000)})["x"]["agg"]
    assert a["schedule"]["deferred"] == run.SCHED_MISS_MAX
    assert a["limited_by"] == "the offered rate" and a["excluded"] is None


def test_burst_cell_whose_server_fell_a_tick_behind_is_in_no_ratio():
    # 3 % of the messages went out after their tick (the window still full):
    # that server got smaller batches at its echoes' times, not the schedule
    rec = agg_of(BURST, {"x": capped_slices(deferred=30_000, busy=0.6),
                         "y": capped_slices(deferred=0, busy=0.6)})
    a = rec["x"]["agg"]
    assert a["limited_by"] == "server (behind the bursts)"
    assert a["does_not_compare_servers"] is False
    assert a["excluded"] == "3.0% of the messages sent after their burst"
    assert rec["y"]["agg"]["vs"]["x"]["cpu"] is None


def test_burst_cell_behind_its_bursts_with_a_busy_generator_is_marked():
    a = agg_of(BURST, {"x": capped_slices(deferred=30_000, busy=0.99)})["x"]["agg"]
    assert a["limited_by"] == "load generator" and a["does_not_compare_servers"] is True
    assert "either side" in a["excluded"]


# ---- uncapped cells keep the 90 % rule ----

def test_uncapped_cell_keeps_the_90_percent_busy_rule():
    case = run.Case("pp-64-c10", "pingpong", 64, 10)
    rec = agg_of(case, {"x": [sl(r, 100_000, 9.5, busy=0.95) for r in range(4)],
                        "y": [sl(r, 100_000, 9.5, busy=0.85) for r in range(4)]})
    assert rec["x"]["agg"]["limited_by"] == "load generator"
    assert rec["y"]["agg"]["limited_by"] == "server"
    assert rec["x"]["agg"]["schedule"] is None


# ---- the sign test: within the noise unless the rounds agree ----

def test_sign_verdict():
    sv = run.sign_verdict
    assert sv([1.1, 1.2, 1.05, 1.01])["verdict"] == "ahead"   # 4 of 4: p = 1/16
    assert sv([1.1, 1.2, 1.05, 0.99])["verdict"] == "noise"   # 3 of 4
    assert sv([0.9, 0.95, 0.8])["verdict"] == "noise"         # 3 rounds cannot resolve
    assert sv([0.9] * 5)["verdict"] == "behind"
    assert sv([1.1] * 7 + [0.9])["verdict"] == "ahead"        # 7 of 8: p = 0.035
    assert sv([1.1] * 6 + [0.9] * 2)["verdict"] == "noise"    # 6 of 8: p = 0.14
    assert sv([1.0] * 6)["verdict"] == "noise"                # ties are neither side
    assert sv([0.96] * 4, 0.95)["verdict"] == "ahead"         # against a threshold
    assert sv([])["verdict"] == "noise"


def test_peer_ratio_whose_rounds_disagree_is_within_the_noise_in_the_target():
    case = run.Case("pp-64-c1", "pingpong", 64, 1)
    # io_uring ahead of epoll in 3 rounds, behind in 1: median says ahead
    u = [sl(r, 40_000, c) for r, c in enumerate((9.0, 9.0, 9.0, 11.0))]
    e = [sl(r, 40_000, 10.0) for r in range(4)]
    w = [sl(r, 40_000, 12.0) for r in range(4)]
    rec = agg_of(case, {"iocpnet-uring": u, "iocpnet-epoll": e, "uvloop-protocol": w})
    v = rec["iocpnet-uring"]["agg"]["vs"]["iocpnet-epoll"]
    assert v["cpu"] > 1.0 and v["cpu_verdict"]["verdict"] == "noise"
    L = []
    results = {case.name: rec}
    servers = [s for s in run.SERVERS if s.key in rec]
    run.targets_md(L, [case], results, servers)
    row = next(x for x in L if x.startswith("| server CPU per round trip"))
    assert row.endswith("| within the noise |")
    assert "0 of 1 comparable cells met" in row


def test_target_missed_only_when_every_round_says_so():
    case = run.Case("pp-64-c1", "pingpong", 64, 1)
    u = [sl(r, 40_000, 11.0) for r in range(4)]
    e = [sl(r, 40_000, 10.0) for r in range(4)]
    w = [sl(r, 40_000, 12.0) for r in range(4)]
    rec = agg_of(case, {"iocpnet-uring": u, "iocpnet-epoll": e, "uvloop-protocol": w})
    L = []
    run.targets_md(L, [case], {case.name: rec}, [s for s in run.SERVERS if s.key in rec])
    row = next(x for x in L if x.startswith("| server CPU per round trip"))
    assert row.endswith("| **no** |")


def test_peer_table_marks_a_ratio_within_the_noise():
    case = run.Case("pp-64-c10", "pingpong", 64, 10)
    u = [sl(r, 110_000, c) for r, c in enumerate((9.0, 9.0, 9.0, 11.0))]
    e = [sl(r, 100_000, 10.0) for r in range(4)]
    rec = agg_of(case, {"iocpnet-uring": u, "iocpnet-epoll": e})
    meta = {"date_utc": "d", "kernel": "k", "cpu_model": "c", "cpus": 2, "python": "3",
            "gcc": "g", "git_commit": "x"}
    config = {"rounds": 4, "slice": 1.0, "warmup": 0.3, "workers": 1, "quick": False}
    md = run.markdown(meta, config, [case], {case.name: rec},
                      [s for s in run.SERVERS if s.key in rec], [])
    row = next(x for x in md.splitlines() if x.startswith("| ping-pong 64 B × 10 | "))
    # throughput ahead in every round; the CPU ratio's rounds disagree
    assert row == "| ping-pong 64 B × 10 | 1.10 / ≈1.11 |"


# ---- one connection: more, shorter rounds; slow periods left out ----

def test_one_connection_cells_run_twice_the_rounds_of_half_the_length():
    class A:
        rounds, slice = 4, 1.0
    c1 = run.Case("pp-64-c1", "pingpong", 64, 1)
    c10 = run.Case("pp-64-c10", "pingpong", 64, 10)
    assert (run.case_rounds(c1, A), run.case_slice(c1, A)) == (8, 0.5)
    assert (run.case_rounds(c10, A), run.case_slice(c10, A)) == (4, 1.0)
    assert not run.is_c1(run.Case("x", "pingpong", 64, 1, rate=20_000))


def test_one_connection_slice_in_a_slow_state_of_the_machine_is_left_out():
    case = run.Case("pp-16k-c1", "pingpong", 16384, 1)
    # the load generator's own µs per round trip doubles with the server's
    x = [sl(r, 33_000, 14.0, lg_us=14.0) for r in range(3)] + [sl(3, 17_000, 25.0, lg_us=25.5)]
    y = [sl(r, 33_000, 15.0, lg_us=14.2) for r in range(4)]
    rec = agg_of(case, {"x": x, "y": y})
    assert rec["x"]["slices"][3]["slow_machine"] > run.SLOW_MACHINE
    assert not any(s.get("slow_machine") for s in rec["y"]["slices"])
    a = rec["x"]["agg"]
    assert abs(a["server_us"] - 14.0) < 1e-9 and a["slices_used"] == 3
    assert a["slow_machine_slices"] == 1 and not a["disturbed"]
    assert abs(a["loadgen_us"] - 14.0) < 1e-6
    v = a["vs"]["y"]
    assert v["rounds"] == 3  # the slow round is in no pair
    assert abs(v["norm_cpu"] - 15.0 / 14.0 * 14.0 / 14.2) < 1e-6
    # 3 fast slices against 4, all lower: exact p = 1/35
    assert v["fast_state_verdict"]["verdict"] == "ahead"
    assert abs(v["fast_state_verdict"]["p"] - 1 / 35) < 1e-4


def test_bimodal_machine_states_mixed_rounds_are_compared_within_the_fast_state():
    # the quiet run's 64 B x 1 pattern: two states ~1.4x apart, landing on
    # different rounds for different servers; io_uring 5 % cheaper in each state
    case = run.Case("pp-64-c1", "pingpong", 64, 1)
    state = {"u": [0, 0, 1, 1, 0, 1, 0, 1], "e": [0, 1, 1, 1, 0, 0, 1, 0]}
    u = [sl(r, 40_000, 8.5 * (1.4 if st else 1), lg_us=7.3 * (1.4 if st else 1))
         for r, st in enumerate(state["u"])]
    e = [sl(r, 40_000, 8.95 * (1.4 if st else 1), lg_us=7.4 * (1.4 if st else 1))
         for r, st in enumerate(state["e"])]
    rec = agg_of(case, {"iocpnet-uring": u, "iocpnet-epoll": e})
    v = rec["iocpnet-uring"]["agg"]["vs"]["iocpnet-epoll"]
    raw = [x.get("cpu") for x in [v]]
    assert raw and v["fast_state_verdict"]["verdict"] == "ahead"
    assert run.cpu_target_verdict(v) == "ahead"
    # without the state split, the paired rounds of all 8 rounds would disagree
    allr = [(e_["server_cpu_s"] / e_["roundtrips"]) / (u_["server_cpu_s"] / u_["roundtrips"])
            for u_, e_ in zip(u, e)]
    assert run.sign_verdict(allr)["verdict"] == "noise"


def test_one_connection_servers_fast_in_different_rounds_are_still_compared():
    # the states alternate so that no round has both servers' slices fast
    case = run.Case("pp-1k-c1", "pingpong", 1024, 1)
    u = [sl(r, 40_000, 8.5 * (1.4 if r % 2 else 1), lg_us=7.2 * (1.4 if r % 2 else 1))
         for r in range(8)]
    e = [sl(r, 40_000, 9.2 * (1.4 if r % 2 == 0 else 1), lg_us=7.5 * (1.4 if r % 2 == 0 else 1))
         for r in range(8)]
    rec = agg_of(case, {"iocpnet-uring": u, "iocpnet-epoll": e})
    v = rec["iocpnet-uring"]["agg"]["vs"]["iocpnet-epoll"]
    assert v["rounds"] == 0 and v["paired_cpu"] is None and v["excluded"] is None
    assert abs(v["cpu"] - 9.2 / 8.5) < 1e-9
    assert v["fast_state_verdict"]["verdict"] == "ahead"  # 4 v 4 apart: p = 1/70
    assert rec["iocpnet-epoll"]["agg"]["vs"]["iocpnet-uring"]["fast_state_verdict"][
        "verdict"] == "behind"


def test_one_connection_slice_whose_speed_probe_says_slow_is_left_out():
    case = run.Case("pp-64-c1", "pingpong", 64, 1)
    x = [sl(r, 40_000, 8.5, lg_us=7.3) for r in range(4)]
    for r, (b, a) in enumerate(((23.0, 23.1), (23.0, 33.0), (33.0, 32.9), (23.2, 23.0))):
        x[r]["core_speed"] = {"before": {"0": b, "1": 23.0}, "after": {"0": a, "1": 23.0}}
    rec = agg_of(case, {"x": x})
    # only the slice with both probes slow is (the one with one slow probe is not)
    assert [s.get("slow_machine") for s in rec["x"]["slices"]] == [None, None, 1.43, None]
    assert rec["x"]["agg"]["core_us"] == 23.0


def test_speed_states_table_counts_slices_whose_probes_both_say_slow():
    c10 = run.Case("pp-64-c10", "pingpong", 64, 10)
    x = [sl(r, 100_000, 7.0) for r in range(4)]
    for r, (b, a) in enumerate(((23.0, 23.0), (32.5, 32.4), (23.1, 32.5), (32.6, 32.5))):
        x[r]["core_speed"] = {"before": {"0": b, "1": b}, "after": {"0": a, "1": a}}
    rec = agg_of(c10, {"x": x})
    L = []
    run.speed_states_md(L, [c10], [s for s in run.SERVERS if s.key == "x"] or [], {c10.name: rec})
    row = next(x for x in L if x.startswith("| ping-pong 64 B × 10 |"))
    assert row == "| ping-pong 64 B × 10 | 23.0 / 27.8 / 32.5 | 2 of 4 |"


def test_witness_probes_are_reported_against_the_slow_slices_they_should_track():
    # the generator's own cost marks rounds 2-3 slow (2x); the mem probe moves
    # with them, the wake probe does not; a disturbed slice counts for neither
    c1 = run.Case("pp-64-c1", "pingpong", 64, 1)
    x = [sl(r, 20_000, 15.0, lg_us=10.0 if r in (0, 1, 4) else 20.0) for r in range(5)]
    for r, s in enumerate(x):
        mem = 90.0 if r in (0, 1, 4) else 150.0
        s["core_speed"] = {k: {"0": 33.0, "1": 33.0, "mem0": mem + d, "mem1": mem, "wake": 40.0}
                           for k, d in (("before", 1.0), ("after", 0.0))}
    x[4]["disturbed"] = "other processes used 0.40 cores"
    rec = agg_of(c1, {"x": x})
    assert [bool(s.get("slow_machine")) for s in x[:4]] == [False, False, True, True]
    w = run.witness_summary(rec["x"]["slices"])
    assert w["mem0"] == {"fast": 90.0, "slow": 150.0, "n_fast": 2, "n_slow": 2}
    assert w["wake"]["fast"] == w["wake"]["slow"] == 40.0
    L = []
    run.witnesses_md(L, [c1], {c1.name: rec})
    assert "| ping-pong 64 B × 1 | 2 / 2 | 90.0 / 150.0 | 90.0 / 150.0 | 40.0 / 40.0 |" in L


def test_mann_whitney_verdict():
    mw = run.mann_whitney_verdict
    assert mw([1, 2, 3, 4], [5, 6, 7, 8])["verdict"] == "ahead"     # p = 1/70
    assert mw([5, 6, 7, 8], [1, 2, 3, 4])["verdict"] == "behind"
    assert mw([1, 2], [3, 4])["verdict"] == "noise"                 # p = 1/6
    assert mw([1, 3, 5, 7], [2, 4, 6, 8])["verdict"] == "noise"
    assert mw([], [1])["verdict"] == "noise"
    assert abs(mw([1, 2, 3], [4, 5, 6, 7])["p"] - 1 / 35) < 1e-4


def test_a_server_that_makes_the_generator_work_more_is_not_a_slow_machine():
    case = run.Case("pp-16k-c1", "pingpong", 16384, 1)
    x = [sl(r, 33_000, 14.0, lg_us=14.0) for r in range(4)]
    y = [sl(r, 25_000, 20.0, lg_us=20.0) for r in range(4)]  # 1.4x, in every round
    rec = agg_of(case, {"x": x, "y": y})
    assert not any(s["disturbed"] for r in rec.values() for s in r["slices"])
    assert rec["x"]["agg"]["vs"]["y"]["cpu_verdict"]["verdict"] == "ahead"


def test_uncapped_multi_connection_cells_are_not_filtered_for_slow_periods():
    case = run.Case("pp-64-c10", "pingpong", 64, 10)
    x = [sl(r, 100_000, 7.0, lg_us=7.0) for r in range(3)] + [sl(3, 50_000, 14.0, lg_us=14.0)]
    rec = agg_of(case, {"x": x})
    assert not any(s["disturbed"] for s in rec["x"]["slices"])


# ---- re-measuring some cases of a saved run (--merge) ----

def test_merge_replaces_the_remeasured_cases_whole_and_says_so():
    def run_of(cases, date, commit):
        return {"meta": {"date_utc": date, "git_commit": commit, "command": "c"},
                "config": {"rounds": 4, "slice": 1.0}, "servers": {"x": {}, "y": {}},
                "warnings": [f"w {date}"],
                "cases": [{"name": n, "servers": {"x": {"tag": date}, "y": {"tag": date}}}
                          for n in cases]}
    saved = run_of(["a", "b", "c"], "old", "111")
    merged = run.merge_runs(saved, run_of(["b", "d"], "new", "222"))
    assert [c["name"] for c in merged["cases"]] == ["a", "b", "c", "d"]
    assert [c["servers"]["x"]["tag"] for c in merged["cases"]] == ["old", "new", "old", "new"]
    assert merged["meta"]["date_utc"] == "old"
    (note,) = merged["meta"]["remeasured"]
    assert (note["cases"], note["git_commit"], note["rounds"]) == (["b", "d"], "222", 4)
    assert merged["warnings"] == ["w old", "re-measured cases (new): w new"]
    assert saved["meta"].get("remeasured") is None  # the saved run itself is not modified


def test_a_merging_run_never_writes_its_own_summary_over_the_run_it_merges_into():
    latest = os.path.join(run.RESULTS, "latest.json")
    a = run.parse_args(["--only", "pp-64-c1", "--merge", latest, "--write-docs"])
    assert run.summary_name(a, publish=True) == "partial"
    a = run.parse_args(["--only", "pp-64-c1", "--merge", latest, "--out", "latest"])
    assert run.summary_name(a, publish=False) == "partial"
    a = run.parse_args(["--only", "pp-64-c1", "--merge", latest, "--out", "c1-again"])
    assert run.summary_name(a, publish=False) == "c1-again"
    a = run.parse_args(["--write-docs", "--only", "pp-64-c1"])  # no merge: as before
    assert run.summary_name(a, publish=True) == "latest"


if __name__ == "__main__":
    import pytest
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
