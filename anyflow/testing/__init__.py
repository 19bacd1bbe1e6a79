"""Test support: tiny local model configs, tolerance rules and reference helpers (no hub access)."""
