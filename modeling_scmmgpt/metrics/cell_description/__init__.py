"""`evaluate` module folder: `evaluate.load(metric_path("cell_description"))` loads `cell_description.py`."""
