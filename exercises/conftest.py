"""After the checks of `python -m pytest exercises`: one line per exercise, done or not, so a student sees at once
where they stand (pytest alone would print an 's' for each exercise not done yet)."""


def pytest_terminal_summary(terminalreporter):
    status = {}
    for outcome, mark in (("passed", "right"), ("failed", "WRONG (see above)"), ("error", "ERROR (see above)"),
                          ("skipped", "")):
        for report in terminalreporter.stats.get(outcome, []):
            name = getattr(report, "nodeid", "").rpartition("::test_")[2]
            if name.startswith("ex"):
                # a skipped check's reason: "exercise N not done yet: ..."
                status[name] = mark or report.longrepr[2].removeprefix("Skipped: ")
    if status:
        terminalreporter.section("exercises")
        for name in sorted(status):
            terminalreporter.write_line(f"{name:22} {status[name]}")
        done = sum(s == "right" for s in status.values())
        terminalreporter.write_line(f"{done} of {len(status)} right")
