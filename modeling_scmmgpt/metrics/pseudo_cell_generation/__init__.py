"""`evaluate` module folder: `evaluate.load(metric_path("pseudo_cell_generation"))` loads the script inside."""
