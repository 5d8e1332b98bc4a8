"""Unit tests of the repository itself: README and docs, make deps, bench/, the suite's guard."""
