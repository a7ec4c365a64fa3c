"""Answers that only call the project's own function (one per exercise): soundness.py checks that every exercise check
refuses them, and that with the refusal off (EXERCISES_ALLOW_REFERENCE=1) they would pass, so that it is the refusal
that catches them. Not in a class handout (exercises/handout.py)."""
