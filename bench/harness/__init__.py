"""The benchmark harness behind bench/run.py, hotspots.py, pipeline.py and accuracy.py, one module per concern."""
