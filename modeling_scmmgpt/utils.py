"""Small shared helpers."""

import os
import tempfile


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename, so a crash never leaves half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX). Without them (e.g. AVX2-only
    CPUs), bf16 autocast is emulated and several times slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_autocast(device_type: str = "cpu", enabled: bool = True):
    """`torch.autocast` in bf16 where that is faster than fp32 (GPUs, CPUs with native bf16), else a no-op, so the
    same code runs at the best precision-speed trade-off on each machine. `enabled=False` forces fp32."""
    import torch

    enabled = enabled and (device_type == "cuda" or (device_type == "cpu" and cpu_has_native_bf16()))
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)
