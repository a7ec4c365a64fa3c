"""Run Triton kernels in Triton's CPU interpreter: the variable must be set before anything imports triton."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
