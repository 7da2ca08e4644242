"""`evaluate` module folder: `evaluate.load(metric_path("cell_type_annotation"))` loads `cell_type_annotation.py`."""
