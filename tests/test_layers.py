"""The package layers (`.importlinter`): applications over trainers over the model side, no upward imports and no
import cycles. import-linter reads every import, including those inside functions."""

import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename='.importlinter', no_cache=True))"


def test_import_contracts_hold():
    # In its own process: import-linter replaces the logging and output streams of the process it runs in.
    result = subprocess.run([sys.executable, "-c", LINT], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("KEPT") == 2 and "BROKEN" not in result.stdout
