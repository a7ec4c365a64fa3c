"""Are the exercise checks sound? Every check must

  - PASS the reference solution (exercises/solutions/): a check that fails a right answer misleads the student;
  - FAIL the typical wrong answer (exercises/broken/): a check that cannot fail proves nothing;
  - REFUSE the answer that only calls the project's own function (exercises/cheats/), and PASS that same answer when
    the refusal is turned off (EXERCISES_ALLOW_REFERENCE=1): so it is the refusal that catches it, not some accident;
  - FAIL every known mistake of exercises/mistakes.py run as an answer, and NAME it in its hint: the hints are matched
    to the mistake made. Each mistake replaces one function of the solution; soundness.py writes these answers into
    a temporary package per round (round k holds each exercise's k-th mistake).

The student's own files are never run. Exits 1 if any check is unsound.

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
sys.path.insert(0, ROOT)


def run_checks(package, allow_reference=False, path=None):
    """Run every check on the answers in `package`: {exercise: (outcome, the failure message)}."""
    env = dict(os.environ, EXERCISES_FROM=package)
    env.pop("EXERCISE_HINT", None)
    env.pop("EXERCISES_ALLOW_REFERENCE", None)
    if allow_reference:
        env["EXERCISES_ALLOW_REFERENCE"] = "1"
    if path:
        env["PYTHONPATH"] = os.pathsep.join([path, env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.xml")
        # The checks read EXERCISES_FROM (exercises/check.py): the package whose modules they test.
        subprocess.run([sys.executable, "-m", "pytest", "exercises/test_exercises.py", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={report}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        results = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed"}.get(child.tag, child.tag)
                    # the element's text is the whole message; its "message" attribute may be cut short
                    message = (child.text or child.get("message") or "").removeprefix("Failed: ")
            results[case.get("name").removeprefix("test_")] = (outcome, message)
        return results


def mistake_rounds(exercises, folder):
    """Write the known mistakes as answers: folder/mistakes_round_k/exNN_name.py holds the solution with exercise
    NN's k-th mistake in place of one function. Returns [(package, {exercise: mistake})], one entry per round."""
    from exercises import mistakes

    per_exercise = {}
    for key, wrong_ones in mistakes.MISTAKES.items():
        exercise, function = key.split(".")
        per_exercise.setdefault(exercise, []).extend((function, mistake) for mistake in wrong_ones)
    rounds = []
    for k in range(max(len(found) for found in per_exercise.values())):
        package = f"mistakes_round_{k + 1}"
        os.makedirs(os.path.join(folder, package))
        open(os.path.join(folder, package, "__init__.py"), "w").close()
        chosen = {}
        for exercise in exercises:
            if k >= len(per_exercise.get(exercise, [])):
                continue
            function, mistake = per_exercise[exercise][k]
            with open(os.path.join(folder, package, exercise + ".py"), "w") as f:
                f.write(f"from exercises.solutions.{exercise} import *  # noqa: F401,F403\n"
                        f"from exercises.mistakes import {mistake.__name__} as {function}  # noqa: F401\n")
            chosen[exercise] = mistake
        rounds.append((package, chosen))
    return rounds


def main():
    exercises = sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(HERE, "ex[0-9][0-9]_*.py")))
    if not os.path.isdir(os.path.join(HERE, "solutions")):
        print("no exercises/solutions/ here (a class handout, exercises/handout.py): nothing to prove")
        return 0
    # A missing answer file would fail its check with an ImportError: that must not count as sound.
    missing = [f"{package}/{name}.py" for name in exercises for package in ("solutions", "broken", "cheats")
               if not os.path.isfile(os.path.join(HERE, package, name + ".py"))]
    if missing:
        sys.exit(f"unsound: no {', '.join(missing)}")
    from exercises import mistakes

    solved = run_checks("exercises.solutions")
    broken = run_checks("exercises.broken")
    cheats = run_checks("exercises.cheats")
    allowed = run_checks("exercises.cheats", allow_reference=True)
    named = {name: [] for name in exercises}     # per exercise: (mistake, named in the hint?)
    with tempfile.TemporaryDirectory() as folder:
        for package, chosen in mistake_rounds(exercises, folder):
            results = run_checks(package, path=folder)
            for exercise, mistake in chosen.items():
                outcome, message = results.get(exercise, ("absent", ""))
                named[exercise].append((mistake, outcome == "failed" and mistakes.describe(mistake) in message))
    unsound = []
    print(f"{'exercise':22} {'solution':9} {'broken':7} {'cheat':8} {'allowed':8} {'mistakes':9} "
          "the check's message on the broken answer")
    for name in exercises:
        good, why_good = solved.get(name, ("absent", ""))
        bad, why_bad = broken.get(name, ("absent", ""))
        cheat, why_cheat = cheats.get(name, ("absent", ""))
        cheat = "refused" if cheat == "failed" and "must not call" in why_cheat else cheat
        unrefused, why_unrefused = allowed.get(name, ("absent", ""))
        caught = sum(ok for _, ok in named[name])
        if good != "passed":
            unsound.append(f"{name}: the solution {good}: {why_good}")
        if bad != "failed":
            unsound.append(f"{name}: the broken answer {bad}, the check cannot catch it {why_bad}")
        if cheat != "refused":
            unsound.append(f"{name}: the cheat {cheat}, not refused: {why_cheat}")
        if unrefused != "passed":
            unsound.append(f"{name}: the cheat with the refusal off {unrefused} (it should pass): {why_unrefused}")
        for mistake, ok in named[name]:
            if not ok:
                unsound.append(f"{name}: the known mistake {mistake.__name__} is not failed and named")
        first_line = why_bad.splitlines()[0] if why_bad else ""
        print(f"{name:22} {good:9} {bad:7} {cheat:8} {unrefused:8} {f'{caught} of {len(named[name])}':9} "
              f"{first_line[:80]}")
    total = sum(len(found) for found in named.values())
    total_named = sum(ok for found in named.values() for _, ok in found)
    sound = len(exercises) - len({problem.split(":")[0] for problem in unsound})
    print(f"{sound} of {len(exercises)} checks sound: they pass the solution, fail the broken answer, refuse the "
          f"cheat (which passes when allowed); {total_named} of {total} known mistakes failed and named")
    for problem in unsound:
        print("UNSOUND", problem)
    return 1 if unsound or not exercises else 0


if __name__ == "__main__":
    sys.exit(main())
