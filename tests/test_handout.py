"""exercises/handout.py builds a class handout that still checks itself: in a copy built into a temporary folder,
`python -m pytest exercises` reports every exercise as "not done yet", and no answer (exercises/solutions/, broken/,
cheats/) is in it."""
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(path) as f:
        return f.read()


def test_the_handout_has_no_answers_and_checks_itself(tmp_path):
    dest = tmp_path / "class"
    subprocess.run([sys.executable, "exercises/handout.py", str(dest)], cwd=ROOT, check=True, capture_output=True)
    for folder in ("solutions", "broken", "cheats"):
        assert not (dest / "exercises" / folder).exists(), f"the handout has exercises/{folder}/"
    assert not (dest / "exercises" / "INSTRUCTORS.md").exists()
    answers = {read(path) for folder in ("solutions", "broken", "cheats")
               for path in glob.glob(os.path.join(ROOT, "exercises", folder, "ex*.py"))}
    copies = [path for path in dest.rglob("*.py") if path.read_text() in answers]
    assert not copies, f"the handout holds answers: {copies}"
    stubs = sorted(glob.glob(os.path.join(ROOT, "exercises", "ex[0-9][0-9]_*.py")))
    assert stubs
    for stub in stubs:
        assert (dest / "exercises" / os.path.basename(stub)).read_text() == read(stub)
    readme = (dest / "exercises" / "README.md").read_text()
    assert "handout: omit" not in readme and "exercises/solutions/" not in readme
    env = {name: value for name, value in os.environ.items()
           if name not in ("EXERCISES_FROM", "EXERCISE_HINT", "EXERCISES_ALLOW_REFERENCE", "PYTHONPATH")}
    run = subprocess.run([sys.executable, "-m", "pytest", "exercises", "-q", "-p", "no:cacheprovider"], cwd=dest,
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    for stub in stubs:
        name = os.path.basename(stub)[:-3]
        number = int(name[2:4])
        assert re.search(rf"^{name} +exercise {number} not done yet", run.stdout, flags=re.M), run.stdout
    assert f"0 of {len(stubs)} right" in run.stdout
    proof = subprocess.run([sys.executable, "exercises/soundness.py"], cwd=dest, env=env, capture_output=True,
                           text=True)
    assert proof.returncode == 0 and "nothing to prove" in proof.stdout
