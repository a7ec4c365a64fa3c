"""Build a class handout: a copy of the repository without the answers, that still checks itself.

    python exercises/handout.py DEST        # DEST: a new (or empty) folder

Left out: exercises/solutions/, exercises/broken/ and exercises/cheats/ (answers), exercises/INSTRUCTORS.md, the git
history (it holds the answers too), and every part of exercises/README.md between the lines
"<!-- handout: omit -->" and "<!-- handout: end -->". Kept: the project, the stub files, the checks, the staged hints
and the known mistakes they match (exercises/mistakes.py: wrong answers, one step from right ones).
In DEST, `python -m pytest exercises` reports every exercise as not done yet; tests/test_handout.py proves it.
"""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEFT_OUT = ("exercises/solutions/", "exercises/broken/", "exercises/cheats/", "exercises/INSTRUCTORS.md")
OMIT = "<!-- handout: omit -->"
END = "<!-- handout: end -->"
SKIPPED_FOLDERS = {".git", ".venv", "__pycache__", ".pytest_cache"}


def repository_files(root):
    """The repository's files, relative to root: what git tracks or would track (not what it ignores); without git,
    every file but caches and virtual environments."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                                capture_output=True, check=True).stdout.decode()
        names = [name for name in listed.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        names = []
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d not in SKIPPED_FOLDERS)
            names += [os.path.relpath(os.path.join(folder, name), root) for name in files]
    names = [name.replace(os.sep, "/") for name in names]
    return sorted(name for name in names if os.path.isfile(os.path.join(root, name)))


def without_omitted(text):
    """text without its blocks between an OMIT line and the next END line (both lines included)."""
    kept = []
    omitting = False
    for line in text.splitlines(keepends=True):
        if line.strip() == OMIT:
            omitting = True
        elif line.strip() == END and omitting:
            omitting = False
        elif not omitting:
            kept.append(line)
    return "".join(kept)


def build(dest, root=ROOT):
    """Copy the handout into dest; returns the copied files' names."""
    if os.path.exists(dest) and os.listdir(dest):
        raise SystemExit(f"{dest} is not empty: give a new folder")
    copied = []
    for name in repository_files(root):
        if name.startswith(LEFT_OUT):
            continue
        target = os.path.join(dest, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if name == "exercises/README.md":
            with open(os.path.join(root, name)) as f:
                text = without_omitted(f.read())
            with open(target, "w") as f:
                f.write(text)
        else:
            shutil.copy2(os.path.join(root, name), target)
        copied.append(name)
    return copied


def main(argv):
    if len(argv) != 1:
        raise SystemExit(__doc__)
    dest = os.path.abspath(argv[0])
    copied = build(dest)
    print(f"wrote {len(copied)} files to {dest}, without {', '.join(LEFT_OUT)}\n"
          f"check it: cd {dest} && python -m pytest exercises    (every exercise: not done yet)")


if __name__ == "__main__":
    main(sys.argv[1:])
