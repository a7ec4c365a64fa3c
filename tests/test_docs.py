"""The documents a reader follows name only what exists: every function, class, file and option they cite in
backticks (docs/READING.md, README.md, exercises/README.md, and each exercise's "Read first:" line) is found in the
code, and every § the code cites is a section of docs/MODEL.md."""
import ast
import builtins
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ["interleave", "kernels", "train", "sample"]
DOCUMENTS = ["docs/READING.md", "README.md", "exercises/README.md"]
FOLDERS = ("benchmarks/", "data/", "docs/", "exercises/", "models/", "tests/")
# Names the documents cite that belong to other libraries, not to this code.
OUTSIDE_NAMES = {"LlavaForConditionalGeneration", "qwen_1_5", "masked_scatter", "repeat_interleave", "exp2"}
IDENTIFIER = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def definitions():
    """{module: top-level names}, {class: member names}, and every identifier (or identifier-like string) that the
    four files and the exercises use."""
    top_level = {}
    members = {}
    used = set(dir(builtins))
    exercises = sorted(glob.glob(os.path.join(ROOT, "exercises", "**", "*.py"), recursive=True))
    for module in MODULES + [os.path.relpath(p, ROOT)[:-3] for p in exercises]:
        tree = ast.parse(read(module + ".py"))
        names = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
        top_level[module] = names
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                body = members.setdefault(node.name, set())
                for item in ast.walk(node):
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        body.add(item.name)
                    elif isinstance(item, ast.Attribute):
                        body.add(item.attr)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        body.add(item.target.id)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                used.add(node.name)
            elif isinstance(node, ast.Name):
                used.add(node.id)
            elif isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif isinstance(node, ast.arg):
                used.add(node.arg)
            elif isinstance(node, ast.keyword) and node.arg:
                used.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                used.add(node.value)
    return top_level, members, used


TOP_LEVEL, MEMBERS, USED = definitions()
EVERY_SOURCE = "\n".join(read(os.path.relpath(p, ROOT)) for p in glob.glob(os.path.join(ROOT, "**", "*.*"),
                                                                            recursive=True)
                         if p.endswith((".py", ".sh")) and "/.venv/" not in p and p != os.path.abspath(__file__))


def missing(span):
    """Why a backticked span names nothing that exists, or None when it does (or is not a name at all)."""
    words = span.split()
    if not words:
        return None
    if words[0] in ("python", "bash") and len(words) > 1:
        words = words[1:]
        if words[0] == "-m":
            return None
    first = words[0].split("(")[0].rstrip(",:")
    if first.startswith("--"):
        flag = first.split("=")[0]
        written = f'"{flag}"' in EVERY_SOURCE or f"'{flag}'" in EVERY_SOURCE
        # train.py's options are made from its Config's field names (--pretrain-tower from pretrain_tower)
        field = flag[2:].replace("-", "_") in TOP_LEVEL["train"] | MEMBERS.get("Config", set())
        return None if written or field else f"option {flag}"
    if first.startswith(FOLDERS):
        return None if glob.glob(os.path.join(ROOT, first)) else f"file {first}"
    if first.endswith((".py", ".md", ".sh", ".json")) and "/" not in first:
        anywhere = glob.glob(os.path.join(ROOT, "**", first), recursive=True)
        # or a file the code writes, such as a run's trainer_state.json
        written = f'"{first}"' in EVERY_SOURCE
        return None if anywhere or written else f"file {first}"
    if first.endswith((".py", ".md", ".sh", ".json")):
        return None
    if len(words) > 1 or not IDENTIFIER.match(first):
        return None
    parts = first.split(".")
    if parts[0] in MODULES and len(parts) == 2:
        return None if parts[1] in TOP_LEVEL[parts[0]] else f"{parts[0]}.py defines no {parts[1]}"
    if parts[0] in MEMBERS and len(parts) == 2:
        return None if parts[1] in MEMBERS[parts[0]] else f"class {parts[0]} has no {parts[1]}"
    if len(parts) == 1 and first not in OUTSIDE_NAMES:
        return None if first in USED else f"no name {first} in the code"
    return None


def cited_spans():
    """(document, span) for every backticked span of the documents and every exercise's "Read first:" names."""
    spans = []
    for document in DOCUMENTS:
        for span in re.findall(r"`([^`\n]+)`", read(document)):
            spans.append((document, span))
    for path in sorted(glob.glob(os.path.join(ROOT, "exercises", "ex*.py"))):
        text = read(os.path.relpath(path, ROOT))
        found = re.search(r"Read first:(.*?)(?:Check:|\n\n)", text, flags=re.S)
        assert found, f"{path} lost its 'Read first:' line"
        for name in re.findall(r"\b(?:interleave|kernels|LlavaInterleave|SelfAttention)\.\w+", found.group(1)):
            spans.append((os.path.relpath(path, ROOT), name))
    return spans


@pytest.mark.parametrize("document", DOCUMENTS + ["exercises/ex*.py"])
def test_every_name_a_document_cites_exists(document):
    spans = [span for where, span in cited_spans() if where == document or
             (document == "exercises/ex*.py" and where.startswith("exercises/ex"))]
    assert spans, f"{document} cites nothing (the pattern that finds its names is broken)"
    problems = sorted({f"`{span}`: {missing(span)}" for span in spans if missing(span)})
    assert not problems, f"{document} names what does not exist:\n  " + "\n  ".join(problems)


def test_every_section_the_code_cites_is_in_model_md():
    sections = set(re.findall(r"^## §(\d+)", read("docs/MODEL.md"), flags=re.M))
    assert sections == {"1", "2", "3", "4", "5", "6"}
    for module in MODULES + ["data/make_m4"]:
        for cited in re.findall(r"§(\d+)", read(module + ".py")):
            assert cited in sections, f"{module}.py cites §{cited}, which docs/MODEL.md does not have"
    for module in MODULES:
        stale = re.findall(r"SPEC(?:\.md| §)", read(module + ".py"))
        assert not stale, f"{module}.py still sends readers to SPEC.md: use docs/MODEL.md"


def test_the_checks_catch_a_name_that_is_gone():
    assert missing("interleave.no_such_function") == "interleave.py defines no no_such_function"
    assert missing("LlavaInterleave.no_such_method") == "class LlavaInterleave has no no_such_method"
    assert missing("no_such_name_anywhere") == "no name no_such_name_anywhere in the code"
    assert missing("benchmarks/no_such_script.py") == "file benchmarks/no_such_script.py"
    assert missing("no_such_output.json") == "file no_such_output.json"
    assert missing("tests/test_no_such_*.py") == "file tests/test_no_such_*.py"
    assert missing("--no-such-option 3") == "option --no-such-option"
    assert missing("interleave.load(path, device=None)") is None
    assert missing("python sample.py -h") is None
