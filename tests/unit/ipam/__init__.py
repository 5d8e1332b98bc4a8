"""Unit tests of ipam/ (pyipam)."""
