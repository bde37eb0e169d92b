"""Helpers shared by the tests (not tests themselves; pytest collects only tests/test_*.py):

- `parity.py`: the backend parity harness: generated weight/activation cases (hypothesis strategies), the
  check of any backend against the reference (`torch`) backend, and the tolerances, with why they are what they are;
- `training.py`: a small prepared QAT model, its optimizers and training loops, shared by the layer, batched-weight,
  companion and multi-step parity tests.

Imported as `from helpers import parity` / `from helpers.training import ...`: pytest puts tests/ on sys.path
(rootdir conftest, `prepend` import mode; tests/ has no __init__.py).
"""
