"""Exercises: re-implement ten pieces of the model; `python -m pytest exercises` checks them (see README.md)."""
