"""After the checks of `python -m pytest exercises`: one line per exercise, done or not, so a student sees at once
where they stand (pytest alone would print an 's' for each exercise not done yet); and, when asked for with
EXERCISE_HINT=1, 2 or 3, the staged hints of each exercise run that is not right yet (exercises/hints.py)."""
import os

import pytest

from exercises.hints import HINTS

HINT_NAMES = ("a nudge", "the idea", "where the project does it")


def hint_level():
    """The hint level asked for: 0 (none), 1, 2 or 3."""
    asked = os.environ.get("EXERCISE_HINT", "0").strip() or "0"
    if asked not in ("0", "1", "2", "3"):
        raise pytest.UsageError(f"EXERCISE_HINT={asked!r}: use 1 (a nudge), 2 (the idea) or 3 (where the project "
                                "does it)")
    return int(asked)


def pytest_configure(config):
    hint_level()   # a wrong value stops the run at once, before the checks


def pytest_terminal_summary(terminalreporter):
    status = {}
    for outcome, mark in (("passed", "right"), ("failed", "WRONG (see above)"), ("error", "ERROR (see above)"),
                          ("skipped", "")):
        for report in terminalreporter.stats.get(outcome, []):
            name = getattr(report, "nodeid", "").rpartition("::test_")[2]
            if name.startswith("ex"):
                # a skipped check's reason: "exercise N not done yet: ..."
                status[name] = mark or report.longrepr[2].removeprefix("Skipped: ")
    if not status:
        return
    terminalreporter.section("exercises")
    for name in sorted(status):
        terminalreporter.write_line(f"{name:22} {status[name]}")
    done = sum(s == "right" for s in status.values())
    terminalreporter.write_line(f"{done} of {len(status)} right")
    level = hint_level()
    if level == 0:
        if done < len(status):
            terminalreporter.write_line("stuck? EXERCISE_HINT=1 (a nudge), 2 (the idea) or 3 (where the project "
                                        "does it) before the command prints hints")
        return
    for name in sorted(status):
        if status[name] == "right":
            continue
        terminalreporter.section(f"hints for {name}", sep="-")
        for number, text in enumerate(HINTS.get(name, [])[:level], start=1):
            terminalreporter.write_line(f"{number}. {HINT_NAMES[number - 1]}: {text}")
