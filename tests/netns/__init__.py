"""Tests that need root and run in throw-away network namespaces."""
