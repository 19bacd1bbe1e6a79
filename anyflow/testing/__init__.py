"""Test support: tolerance rules and reference helpers (the official FAR semantics, host-read counting, Triton
compile checks); the tiny local models the tests build live in :mod:`anyflow.models.tiny`."""
