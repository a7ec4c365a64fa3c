"""The four main files read as docs/STYLE.md asks, measured, so that a regression fails CI.

Each number is the level of the code we read beside ours (nanoGPT, minGPT, llama's model.py, gpt-fast,
build-nanogpt, the Triton attention tutorial) or better:

- at most 8% of the non-blank lines over 100 characters, the 95th percentile of their lengths at most 100, and
  none over 120;
- no lambda bound to a name (`f = lambda ...`, `ctx.f = lambda ...`): a `def` with a docstring line instead;
- no expression statement that is a conditional expression, a tuple, a comprehension or a boolean operator
  (`x() if c else None`, `[f(a) for a in b]`): effects are statements;
- no `import a, b` of several modules: one import per line;
- at most 2 parallel assignments of 3 or more values (`a, b, c = x, y, z`); unpacking one value
  (`b, t, _ = x.shape`, a call's result) is not parallel;
- no function over 80 lines (docstring and nested functions included).
"""
import ast
import io
import os
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_FILES = ["interleave.py", "kernels.py", "train.py", "sample.py"]

MAX_SHARE_OVER_100 = 0.08
MAX_P95_LENGTH = 100
MAX_LENGTH = 120
MAX_PARALLEL_ASSIGNMENTS = 2
MAX_FUNCTION_LINES = 80
EFFECT_EXPRESSIONS = (ast.IfExp, ast.Tuple, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.BoolOp)


def line_lengths(source):
    """Lengths of the non-blank lines, in characters."""
    return [len(line) for line in source.splitlines() if line.strip()]


def percentile(values, share):
    """The nearest-rank percentile: the smallest value with at least `share` of the values at or below it."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * share // 1))
    return ordered[int(rank) - 1]


def named_lambdas(tree):
    """Line numbers of assignments whose value is a lambda."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Lambda):
            found.append(node.lineno)
    return found


def effect_expressions(tree):
    """Line numbers of expression statements that run a conditional, tuple, comprehension or `and`/`or`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, EFFECT_EXPRESSIONS):
            found.append(node.lineno)
    return found


def multi_imports(tree):
    """Line numbers of `import a, b` statements."""
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Import) and len(node.names) > 1]


def parallel_assignments(tree):
    """Line numbers of `a, b, c = x, y, z`: three or more names given three or more separate values."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            is_parallel = isinstance(target, (ast.Tuple, ast.List)) and isinstance(node.value, (ast.Tuple, ast.List))
            if is_parallel and len(target.elts) >= 3:
                found.append(node.lineno)
    return found


def long_functions(tree):
    """(name, first line, length) of every function longer than MAX_FUNCTION_LINES lines."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - first + 1
            if length > MAX_FUNCTION_LINES:
                found.append((node.name, first, length))
    return found


def measure(source):
    """Every number this file checks, for one source text."""
    tree = ast.parse(source)
    tokenize.generate_tokens(io.StringIO(source).readline)  # a file that does not tokenize fails here
    lengths = line_lengths(source)
    return {
        "share_over_100": sum(n > 100 for n in lengths) / len(lengths),
        "p95_length": percentile(lengths, 0.95),
        "longest": max(lengths),
        "named_lambdas": sorted(named_lambdas(tree)),
        "effect_expressions": sorted(effect_expressions(tree)),
        "multi_imports": sorted(multi_imports(tree)),
        "parallel_assignments": sorted(parallel_assignments(tree)),
        "long_functions": long_functions(tree),
    }


def problems(numbers):
    """The rules a file's numbers break, one line each."""
    found = []
    if numbers["share_over_100"] > MAX_SHARE_OVER_100:
        found.append(f"{numbers['share_over_100']:.0%} of lines over 100 characters (at most 8%)")
    if numbers["p95_length"] > MAX_P95_LENGTH:
        found.append(f"95th percentile line length {numbers['p95_length']} (at most {MAX_P95_LENGTH})")
    if numbers["longest"] > MAX_LENGTH:
        found.append(f"a line of {numbers['longest']} characters (at most {MAX_LENGTH})")
    if numbers["named_lambdas"]:
        found.append(f"lambdas bound to names at lines {numbers['named_lambdas']}: write a def")
    if numbers["effect_expressions"]:
        found.append(f"expressions run for their effect at lines {numbers['effect_expressions']}: use statements")
    if numbers["multi_imports"]:
        found.append(f"several modules imported on one line at lines {numbers['multi_imports']}")
    if len(numbers["parallel_assignments"]) > MAX_PARALLEL_ASSIGNMENTS:
        found.append(f"{len(numbers['parallel_assignments'])} parallel assignments of 3+ values at lines "
                     f"{numbers['parallel_assignments']} (at most {MAX_PARALLEL_ASSIGNMENTS})")
    for name, first, length in numbers["long_functions"]:
        found.append(f"function {name} (line {first}) is {length} lines (at most {MAX_FUNCTION_LINES})")
    return found


@pytest.mark.parametrize("name", MAIN_FILES)
def test_main_file_follows_the_style(name):
    with open(os.path.join(ROOT, name)) as f:
        source = f.read()
    found = problems(measure(source))
    assert not found, f"{name}:\n  " + "\n  ".join(found)


BAD_SOURCE = '''\
import os, sys
square = lambda x: x * x
def f(cuda):
    a, b, c = 1, 2, 3
    d, e, g = 4, 5, 6
    h, i, j = 7, 8, 9
    print(cuda) if cuda else None
    [print(x) for x in range(3)]
    cuda and print(cuda)
''' + "    x = 1\n" * 80 + "    y = '" + "z" * 120 + "'\n"


def test_the_measurements_catch_each_rule_broken():
    numbers = measure(BAD_SOURCE)
    assert numbers["named_lambdas"] == [2]
    assert numbers["effect_expressions"] == [7, 8, 9]
    assert numbers["multi_imports"] == [1]
    assert numbers["parallel_assignments"] == [4, 5, 6]
    assert [name for name, _, _ in numbers["long_functions"]] == ["f"]
    assert numbers["longest"] == 130
    assert len(problems(numbers)) == 6
    wide = problems(measure("x = '" + "z" * 100 + "'\n"))
    assert wide[:2] == ["100% of lines over 100 characters (at most 8%)",
                        "95th percentile line length 106 (at most 100)"]


def test_the_measurements_pass_code_written_as_the_rules_ask():
    good = 'import os\n\n\ndef f(x):\n    """Square x."""\n    b, t, _ = x.shape\n    return b * t\n'
    numbers = measure(good)
    assert problems(numbers) == []
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], 0.95) == 19
