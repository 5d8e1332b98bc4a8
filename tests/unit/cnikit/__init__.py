"""Unit tests of cnikit/."""
