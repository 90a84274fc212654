"""The CPU backend's C code (this folder's .c files), compiled on first use and loaded with ctypes.

A plain C file with no Python or torch headers compiles in well under a second, so it is built
into the user's cache the first time it is needed. Without a C compiler duskpool still works:
`available()` is False and the slower numpy and torch paths in `quant.py` and `ops.py` are used instead.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

from duskpool import paths

SOURCES = sorted(Path(__file__).parent.glob("*.c"))  # compiled together into one library
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math", "-fno-math-errno",
         "-ffp-contract=fast", "-shared", "-fPIC", "-std=c11", "-pthread"]


def cache_dir() -> Path:
    return paths.cache_dir() / "kernels"


def _compile(sources: list[Path], target: Path) -> bool:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        for flags in (FLAGS, [f for f in FLAGS if f != "-march=native"]):
            done = subprocess.run([compiler, *flags, *map(str, sources), "-o", str(out), "-lm"], capture_output=True)
            if done.returncode == 0:
                os.replace(out, target)  # atomic: concurrent processes never see half a library
                return True
    return False


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when no C compiler is available."""
    sources = b"".join(source.read_bytes() for source in SOURCES + HEADERS)  # a header change is a new library
    key = hashlib.sha256(sources + " ".join(FLAGS).encode() + platform.machine().encode())
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    target = cache_dir() / f"kernels-{key.hexdigest()[:16]}{suffix}"
    if not target.exists() and not _compile(SOURCES, target):
        print("duskpool: no working C compiler found; using the slower numpy kernels", file=sys.stderr)
        return None
    lib = ctypes.CDLL(str(target))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.dp_matmul.argtypes = [ctypes.c_int, ptr, i64, i64, i64, i64, ptr, i64, ptr, i64]
    lib.dp_matmul.restype = None
    lib.dp_dequantize_rows.argtypes = [ctypes.c_int, ptr, i64, ptr, i64, i64, ptr]
    lib.dp_dequantize_rows.restype = None
    lib.dp_set_threads.argtypes = [ctypes.c_int]
    lib.dp_set_threads.restype = None
    lib.dp_get_threads.argtypes = []
    lib.dp_get_threads.restype = ctypes.c_int
    f32 = ctypes.c_float
    lib.dp_rms_norm.argtypes = [ptr, ptr, f32, ptr, i64, i64]
    lib.dp_rope.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr]
    lib.dp_attention.argtypes = [ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, i64, f32, i64]
    lib.dp_attention_batch.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, i64, ptr, i64, i64, i64, i64, i64, f32, i64]
    lib.dp_silu_mul.argtypes = [ptr, ptr, i64, i64]
    lib.dp_store_kv.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, ptr, i64, i64]
    for f in (lib.dp_rms_norm, lib.dp_rope, lib.dp_attention, lib.dp_attention_batch, lib.dp_silu_mul, lib.dp_store_kv):
        f.restype = None
    lib.dp_init()
    return lib


def available() -> bool:
    return library() is not None
