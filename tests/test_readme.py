"""The README's table of files and line budgets stays true."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_line_counts_and_budgets_in_the_readme_are_true():
    readme = open(os.path.join(ROOT, "README.md")).read()
    rows = re.findall(r"^\| `([^`]+)` \| [^|]+ \| (\d+) \| (\d+|—) \|$", readme, flags=re.M)
    assert len(rows) >= 3, "README.md lost its table of files"
    for path, lines, budget in rows:
        with open(os.path.join(ROOT, path)) as f:
            actual = sum(1 for _ in f)
        assert actual == int(lines), f"README says {path} has {lines} lines; it has {actual}"
        assert budget == "—" or actual <= int(budget), f"{path}: {actual} lines, over its budget of {budget}"
