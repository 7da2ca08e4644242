"""Small shared helpers."""

import contextlib
import json
import os
import tempfile


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yields a temporary path next to `path` (same folder, same suffix, so writers that go by the extension still
    work); when the block finishes, the file is flushed to disk and renamed onto `path` in one step. If the block
    fails, the temporary file is removed and `path` is untouched: a crash, a full disk or an error never leaves half
    a file, and writing over an input file replaces it only once the new one is complete."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # already renamed; cleanup must never raise over the real error
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename, so a crash never leaves half a file."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def read_json(path: str | os.PathLike):
    """A saved JSON file (a config, a vocabulary); a corrupt one raises one line naming the file and the fix."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}: not valid JSON ({error}); re-save the processor or re-download the model."
            ) from error


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


PRECISION_ENV = "SCMMGPT_CPU_BF16"


def precision_forced() -> bool:
    """Whether `SCMMGPT_CPU_BF16` forces the precision (see [`cpu_has_native_bf16`])."""
    return bool(os.environ.get(PRECISION_ENV, "").strip())


def cpu_info(field: str) -> str:
    """The first value of `field` (e.g. `"model name"`, `"flags"`) in `/proc/cpuinfo`; empty where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":")[0].strip() == field), "")
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """This CPU's feature flags (`/proc/cpuinfo`)."""
    return set(cpu_info("flags").split())


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX). Without them (e.g. AVX2-only
    CPUs), bf16 is emulated and several times slower than fp32.

    `SCMMGPT_CPU_BF16=1` or `0` overrides the answer, in this process and the processes it starts: every choice of
    precision made from it (stage 3's default `bf16`, the inference fast mode) then takes the bf16 or the fp32 path
    on any CPU, e.g. to run the tests of the path this machine would not take."""
    forced = os.environ.get(PRECISION_ENV, "").strip().lower()
    if forced in ("1", "true", "bf16"):
        return True
    if forced in ("0", "false", "fp32"):
        return False
    if forced:
        raise ValueError(f"{PRECISION_ENV}={forced!r}: use 1 (bf16) or 0 (fp32), or unset it to follow the CPU.")
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


class StrictLoadingMixin:
    """`from_pretrained` that loads only a whole, matching safetensors checkpoint, or fails in one line naming the
    file. transformers' own default warns and initialises missing weights at random, which turns a folder of another
    architecture or a partly saved one into a silently wrong model; it also raises raw deserialiser errors for a
    truncated file. Pickled weights (`pytorch_model.bin`) are not read at all: safetensors only."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        from safetensors import SafetensorError

        source = str(pretrained_model_name_or_path)
        if os.path.isdir(source) and not any(n.endswith(".safetensors") for n in os.listdir(source)):
            found = ", ".join(n for n in sorted(os.listdir(source)) if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
            raise OSError(
                f"{source}: no model.safetensors"
                + (f" (only pickled weights: {found})" if found else "")
                + "; scMMGPT loads safetensors only. Re-save the model with save_pretrained, or convert "
                "a scGPT checkpoint with `scmmgpt convert-scgpt`."
            )
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("use_safetensors", True)
        kwargs.setdefault("ignore_mismatched_sizes", True)  # reported below, by name, instead of a RuntimeError
        try:
            model, info = super().from_pretrained(source, *args, output_loading_info=True, **kwargs)
        except SafetensorError as error:
            raise OSError(
                f"{source}: the safetensors weights are truncated or corrupt ({error}); re-download or "
                "re-save the model."
            ) from error
        problems = {
            kind: sorted(info.get(kind) or ()) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
        }
        problems = {kind: keys for kind, keys in problems.items() if keys}
        if problems:
            text = "; ".join(
                f"{len(keys)} {kind.replace('_', ' ')} (e.g. {keys[0]})" for kind, keys in problems.items()
            )
            raise ValueError(
                f"{source}: the weights do not fit {cls.__name__}: {text}. The folder holds another "
                "architecture or an incomplete save; load it with the class that saved it."
            )
        return (model, info) if want_info else model
