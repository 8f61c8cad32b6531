"""Judging models: `distil evaluate` (command) and its held-out scoring (heldout), `distil review` of an
experiment's runs (review)."""
