"""Plausible wrong answers, one per exercise: soundness.py checks that every exercise check catches its one."""
