"""Exercises: re-implement seventeen pieces of the model; `python -m pytest exercises` checks them (see README.md)."""
