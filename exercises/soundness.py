"""Are the exercise checks sound? Every check must PASS the reference solutions (exercises/solutions/) and FAIL the
deliberately wrong answers (exercises/broken/): a check that cannot fail proves nothing, and one that fails a right
answer misleads the student. The student's own files are never run. Exits 1 if any check is unsound.

    python exercises/soundness.py
"""
import glob
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_checks(package):
    """Run every check on the answers in `package`: {exercise: (outcome, first line of the failure message)}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.xml")
        # The checks read EXERCISES_FROM (exercises/check.py): the package whose modules they test.
        subprocess.run([sys.executable, "-m", "pytest", "exercises/test_exercises.py", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={report}"], cwd=ROOT, env=dict(os.environ, EXERCISES_FROM=package),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed"}.get(child.tag, child.tag)
                    message = (child.get("message") or "").removeprefix("Failed: ").splitlines()[0]
            results[case.get("name").removeprefix("test_")] = (outcome, message)
        return results


def main():
    exercises = sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(HERE, "ex[0-9][0-9]_*.py")))
    # A missing solution or broken file would fail its check with an ImportError: that must not count as sound.
    missing = [f"{package}/{name}.py" for name in exercises for package in ("solutions", "broken")
               if not os.path.isfile(os.path.join(HERE, package, name + ".py"))]
    if missing:
        sys.exit(f"unsound: no {', '.join(missing)}")
    solved, broken = run_checks("exercises.solutions"), run_checks("exercises.broken")
    unsound = 0
    print(f"{'exercise':22} {'solution':9} {'broken':8} the check's message on the broken answer")
    for name in exercises:
        (good, why_good), (bad, why_bad) = solved.get(name, ("absent", "")), broken.get(name, ("absent", ""))
        if good != "passed":
            note = f"UNSOUND: the solution {good}: {why_good}"
        elif bad != "failed":
            note = f"UNSOUND: the broken answer {bad}, the check cannot catch it {why_bad}"
        else:
            note = why_bad
        unsound += note.startswith("UNSOUND")
        print(f"{name:22} {good:9} {bad:8} {note[:100]}")
    print(f"{len(exercises) - unsound} of {len(exercises)} checks sound: they pass the solution and fail the broken "
          "answer")
    return 1 if unsound or not exercises else 0


if __name__ == "__main__":
    sys.exit(main())
