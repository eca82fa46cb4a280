"""The benchmark harness behind bench/run.py, bench/profile.py and bench/accuracy.py, one module per concern."""
