"""What failed in one pytest suite of scripts/test.sh, from its JUnit XML report (pytest
--junitxml): the counts, the backends the failures were on, and a line per failed test,
with its own teardown's error beside it rather than as a second test.  test.sh prints it
at the very end of a failed run, for a reviewer who reads only the end of CI's output.

    python3 scripts/ci_failures.py REPORT.xml
"""
import re
import sys
import xml.etree.ElementTree as ET

BACKENDS = ("io_uring", "epoll", "iocp")
WIDTH = 240                  # a line of CI's log, not a traceback: the first line, cut
MOST = 25                    # tests listed; the rest counted


def test_id(case):
    """tests/test_cli.py::test_x[io_uring] from junit's classname and name."""
    parts = case.get("classname", "").split(".")
    for i, part in enumerate(parts):
        if part.startswith("test_"):
            return "::".join(["/".join(parts[:i + 1]) + ".py", *parts[i + 1:],
                              case.get("name", "")])
    return "::".join(p for p in (case.get("classname"), case.get("name")) if p)


def line(head, message):
    """head and the message's first line, cut to WIDTH."""
    text = head + message.strip().split("\n", 1)[0]
    return text if len(text) <= WIDTH else text[:WIDTH - 3] + "..."


def outcome(element):
    """(tag, where, message): where is "" for the test itself, else "at its setup: " or
    "at its teardown: " (after a failed call, pytest reports its teardown's error as a
    second testcase of the same name)."""
    message = element.get("message", "")
    phase = re.match(r'failed on (setup|teardown) with "(.*)"\Z', message, re.S)
    if element.tag == "error" and phase:
        return element.tag, f"at its {phase.group(1)}: ", phase.group(2)
    return element.tag, "", message


def main(path):
    root = ET.parse(path).getroot()
    results = {}             # test id -> [(tag, where, message)], in the report's order
    counts = {"failure": 0, "error": 0, "skipped": 0}
    not_passed = set()       # (a test whose only error is its teardown's passed, to pytest)
    for case in root.iter("testcase"):
        tid = test_id(case)
        outcomes = results.setdefault(tid, [])
        for element in case:
            if element.tag not in counts:
                continue
            counts[element.tag] += 1
            if element.tag == "skipped":
                not_passed.add(tid)
                continue
            outcomes.append(outcome(element))
            if outcomes[-1][1] != "at its teardown: ":
                not_passed.add(tid)
    counts["passed"] = len(results) - len(not_passed)
    bad = {tid: outs for tid, outs in results.items() if outs}
    # pytest's own counts, as its last line above gives them
    what = ", ".join([f"{counts['failure']} failed"] * bool(counts["failure"])
                     + [f"{counts['error']} error" + "s" * (counts["error"] > 1)]
                     * bool(counts["error"]))
    on = [b for b in BACKENDS if any(re.search(rf"[\[-]{b}[\]-]", tid) for tid in bad)]
    what = what + (f" (on {' and '.join(on)})" if on else "") if what else "no test failed"
    print(f"  pytest: {what}; {counts['passed']} passed, {counts['skipped']} skipped"
          f" (the report: {path})")
    for i, (tid, outs) in enumerate(bad.items()):
        if i == MOST:
            print(f"  ... and {len(bad) - MOST} more (the report has them all)")
            break
        (tag, where, message), *more = outs
        print(line(f"  {'FAILED' if tag == 'failure' else 'ERROR'} {tid} - {where}", message))
        for tag, where, message in more:
            print(line(f"      and {where or 'then: '}", message))


if __name__ == "__main__":
    main(sys.argv[1])
