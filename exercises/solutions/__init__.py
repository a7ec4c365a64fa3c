"""Reference solutions: soundness.py checks that every exercise check passes them. Spoilers!"""
