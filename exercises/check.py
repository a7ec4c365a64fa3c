"""What the exercise checks share: which implementation they test, how an answer is run (a stub is "not done yet";
the project functions it re-implements refuse to run meanwhile), and failure messages that say what differs, with a
hint matched to the mistake made (exercises/mistakes.py)."""
import contextlib
import copy
import dataclasses
import importlib
import inspect
import os

import pytest
import torch

# The package the checks take the answers from: the student's files by default. soundness.py points it at
# exercises.solutions (every check must pass), exercises.broken and exercises.cheats (every check must fail), and at
# packages it makes from exercises/mistakes.py (every check must fail and name the mistake).
PACKAGE = os.environ.get("EXERCISES_FROM", "exercises")
# soundness.py only: "1" lets the answers call the project's functions, to show that the cheats would pass without
# the refusal (so that it is the refusal, and nothing else, that fails them).
ALLOW_REFERENCE = os.environ.get("EXERCISES_ALLOW_REFERENCE") == "1"


def answer(name):
    """The module under test, e.g. answer("ex01_rmsnorm") -> exercises/ex01_rmsnorm.py."""
    return importlib.import_module(f"{PACKAGE}.{name}")


# ---- refusing the project's own functions while an answer runs

class Refused(Exception):
    """Raised by a project function that the answer under test must not call."""


def qualified_name(item):
    """interleave.apply_rotary, interleave.KVCache.update, torch.nn.functional.gelu: how a message names a function."""
    if isinstance(item, tuple):
        owner, name = item
        return f"{owner.__name__}.{name}"
    function = inspect.unwrap(item)
    return f"{function.__module__}.{function.__qualname__}"


def refusing_code(function, message):
    """A code object that raises Refused(message), to put in place of function's own code.

    Python accepts a new __code__ only with the same free variables (a method that calls super() has one, __class__),
    so the refusing function is written with those names. It finds Refused through __import__, because it runs with
    the globals of the function it replaces (interleave's, say), where the name Refused means nothing.
    """
    names = function.__code__.co_freevars
    lines = ["def enclosing():"]
    for name in names:
        lines.append(f"    {name} = None")
    lines.append("    def refuse(*args, **kwargs):")
    for name in names:
        lines.append(f"        {name}")   # a use, which makes the name a free variable of refuse
    lines.append(f"        raise __import__({__name__!r}, fromlist=['Refused']).Refused({message!r})")
    lines.append("    return refuse")
    namespace = {}
    exec("\n".join(lines), namespace)
    code = namespace["enclosing"]().__code__
    if code.co_freevars != names:
        raise RuntimeError(f"cannot refuse {qualified_name(function)}: free variables {names}, made {code.co_freevars}")
    return code


@contextlib.contextmanager
def refusing(number, forbidden):
    """While the block runs, each forbidden project function raises Refused instead of running.

    forbidden: Python functions and methods (interleave.apply_rotary, interleave.KVCache.update): their CODE is
    swapped, not their name in the module, so that `from interleave import apply_rotary`, an alias or a subclass made
    before the call is refused too; or (module, name) pairs for built-in functions (torch.nn.functional, "gelu"),
    replaced by name. Everything is put back afterwards.
    """
    saved = []
    if ALLOW_REFERENCE:
        forbidden = ()
    try:
        for item in forbidden:
            message = f"exercise {number} must not call {qualified_name(item)}: write it yourself"
            if isinstance(item, tuple):
                owner, name = item

                def refuse(*args, message=message, **kwargs):
                    """The built-in's stand-in while the answer runs."""
                    raise Refused(message)

                saved.append((owner, name, getattr(owner, name)))
                setattr(owner, name, refuse)
                continue
            function = inspect.unwrap(item)   # a decorated method (@torch.no_grad()): the function inside
            saved.append((function, "__code__", function.__code__))
            function.__code__ = refusing_code(function, message)
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def attempt(number, fn, *args, forbid=(), **kwargs):
    """Call the answer's fn, with the project functions in forbid refusing to run (see refusing).

    A stub that still raises NotImplementedError skips the check with one line; an answer that calls a forbidden
    function fails with one line; any other exception is a bug in the answer, and pytest shows its traceback.
    """
    try:
        with refusing(number, forbid):
            return fn(*args, **kwargs)
    except NotImplementedError:
        undone = True
    except Refused as refusal:
        undone = False
        message = str(refusal)
    # outside the except blocks: a failure here is the answer's, not a second exception while handling the first
    if undone:
        path = os.path.relpath(importlib.import_module(fn.__module__).__file__)
        name = getattr(fn, "__qualname__", type(fn).__name__)
        pytest.skip(f"exercise {number} not done yet: {name} in {path}")
    fail(message, "the point is to write it: the project's function is the reference your answer is compared with "
                  "(EXERCISE_HINT=1 or 2 for a hint)")


# ---- failures that say what differs, and hints matched to the mistake made

def fail(message, hint=""):
    """A wrong answer: the message alone, no traceback of the check (it is not the check that is wrong)."""
    hint = str(hint)   # a Hint works out its text only now
    pytest.fail(message + (f"\n  hint: {hint}" if hint else ""), pytrace=False)


def alike(a, b):
    """Whether two outputs agree: tensors of one shape and dtype with equal values (floats within rounding: all close
    in float32 and float64, 99% of the elements exactly equal in bfloat16 and float16); sequences and dataclasses
    element by element; anything else by ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype in (torch.bfloat16, torch.float16):
            return a.numel() == 0 or (a == b).float().mean().item() >= 0.99
        if a.dtype == torch.float64:
            return torch.allclose(a, b, rtol=1e-7, atol=1e-9, equal_nan=True)
        if a.is_floating_point():
            return torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
        return torch.equal(a, b)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        if type(a) is not type(b):
            return False
        return all(alike(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(alike(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except (TypeError, RuntimeError, ValueError):
        return False


def copy_of(x):
    """A deep copy of x, or x itself when it cannot be copied (a tokenizer, say)."""
    try:
        return copy.deepcopy(x)
    except Exception:
        return x


class Hint:
    """A failure's hint, worked out only when the check fails: the hint of the known mistake in exercises/mistakes.py
    whose output on the same inputs is the answer's output, else the general hint.

    key: "ex02_rotary.apply_rotary", the exercise and the function (or class) it asks for; got: the answer's output;
    inputs: what the answer was called with (each mistake gets a deep copy); run(candidate): how to get a candidate's
    output when calling it with inputs is not enough (a class, a loop over blocks).
    """

    def __init__(self, key, general, got=None, *inputs, run=None):
        self.key = key
        self.general = general
        self.got = got
        self.inputs = inputs
        self.run = run

    def output_of(self, mistake):
        """The mistake's output on the answer's inputs, or None if it raises."""
        try:
            if self.run is not None:
                return self.run(mistake)
            return mistake(*[copy_of(x) for x in self.inputs])
        except Exception:
            return None

    def __str__(self):
        try:
            from exercises import mistakes   # here, not at the top: a handout may leave mistakes.py out
        except ImportError:
            return self.general
        for mistake in mistakes.MISTAKES.get(self.key, []):
            wrong = self.output_of(mistake)
            if wrong is not None and alike(self.got, wrong):
                return f"yours behaves like a known mistake: {mistakes.describe(mistake)}"
        return self.general


def same_tensor(what, got, want, hint="", atol=1e-5, rtol=1e-5):
    """Fail unless got matches the reference tensor want: type, then shape, dtype, and values (within atol + rtol
    for floats, exactly otherwise). The message names the first element that differs."""
    if not isinstance(got, torch.Tensor):
        fail(f"{what}: expected a tensor, got {type(got).__name__}", hint)
    if got.shape != want.shape:
        fail(f"{what}: yours has shape {tuple(got.shape)}, the reference {tuple(want.shape)}", hint)
    if got.dtype != want.dtype:
        fail(f"{what}: yours has dtype {got.dtype}, the reference {want.dtype}", hint)
    if want.is_floating_point():
        ok = torch.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
    else:
        ok = got == want
    if not ok.all():
        bad = (~ok).nonzero()
        at = tuple(bad[0].tolist())
        fail(f"{what}: {len(bad)} of {want.numel()} elements differ; the first at index {list(at)}: "
             f"reference {want[at].item():.6g}, yours {got[at].item():.6g}", hint)


def same_list(what, got, want, hint=""):
    """Fail unless the sequence got equals the reference list want; the message names the first difference."""
    got = list(got)
    if got == want:
        return
    both = f"\n  reference {want}\n  yours     {got}" if len(want) <= 40 else ""   # short lists only
    if len(got) != len(want):
        fail(f"{what}: yours has {len(got)} entries, the reference {len(want)}{both}", hint)
    i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    fail(f"{what}: entry {i} differs: reference {want[i]!r}, yours {got[i]!r}{both}", hint)


def in_parts(number, module, parts):
    """An exercise of several functions: run each part's check even when another part is not done yet.

    parts: (name, check) pairs, check() failing through fail() or skipping through attempt(). Fails with the message of
    every wrong part; else skips as "not done yet" if a part is undone; else passes.
    """
    problems = []
    undone = []
    for name, check in parts:
        try:
            check()
        except pytest.skip.Exception:
            undone.append(name)
        except pytest.fail.Exception as failure:
            problems.append(str(failure.msg))
    if problems:
        pytest.fail("\n".join(problems + [f"({name} is not done yet)" for name in undone]), pytrace=False)
    if undone:
        pytest.skip(f"exercise {number} not done yet: {' and '.join(undone)} in {os.path.relpath(module.__file__)}")
