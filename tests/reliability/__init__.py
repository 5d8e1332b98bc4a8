"""Reliability and security: crash trials, churn, lock contention, fuzzing and hostile input."""
