"""What the exercise checks share: which implementation they test, and failure messages that say what differs."""
import importlib
import os

import pytest
import torch

# The package the checks take the answers from: the student's files by default. soundness.py points it at
# exercises.solutions (every check must pass) and exercises.broken (every check must fail).
PACKAGE = os.environ.get("EXERCISES_FROM", "exercises")


def answer(name):
    """The module under test, e.g. answer("ex01_rmsnorm") -> exercises/ex01_rmsnorm.py."""
    return importlib.import_module(f"{PACKAGE}.{name}")


def attempt(number, fn, *args, **kwargs):
    """Call the answer's fn. A stub that still raises NotImplementedError skips the check with one line;
    any other exception is a bug in the answer, and pytest shows its traceback."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        path = os.path.relpath(importlib.import_module(fn.__module__).__file__)
        pytest.skip(f"exercise {number} not done yet: {fn.__qualname__} in {path}")


def fail(message, hint=""):
    """A wrong answer: the message alone, no traceback of the check (it is not the check that is wrong)."""
    pytest.fail(message + (f"\n  hint: {hint}" if hint else ""), pytrace=False)


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
