"""Adapters in other libraries' formats (no torch needed to write them)."""
