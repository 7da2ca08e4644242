"""SCMMGPT_CPU_BF16 forces the precision path on any CPU, in-process and in the processes a run starts."""

import os
import subprocess
import sys

import pytest

from modeling_scmmgpt.utils import PRECISION_ENV, cpu_has_native_bf16


@pytest.mark.parametrize("value, expected", [("1", True), ("bf16", True), ("0", False), ("FP32", False)])
def test_the_switch_decides_the_path(monkeypatch, tmp_path, value, expected):
    from trainers import ScMMGPTInstructionArguments

    monkeypatch.setenv(PRECISION_ENV, value)
    assert cpu_has_native_bf16() is expected
    args = ScMMGPTInstructionArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert args.bf16 is expected  # stage 3's default precision follows it
    child = subprocess.run(
        [sys.executable, "-c", "from modeling_scmmgpt.utils import cpu_has_native_bf16 as f; print(f())"],
        capture_output=True,
        text=True,
        env={**os.environ, PRECISION_ENV: value},
    )
    assert child.stdout.strip() == str(expected)


def test_unset_follows_the_cpu_and_a_bad_value_is_refused(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        flags = f.read()
    assert cpu_has_native_bf16() is ("avx512_bf16" in flags or "amx_bf16" in flags)
    monkeypatch.setenv(PRECISION_ENV, "maybe")
    with pytest.raises(ValueError, match="SCMMGPT_CPU_BF16='maybe'"):
        cpu_has_native_bf16()
