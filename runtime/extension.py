"""Build and load the C++ kernels (``csrc/reuse_kernels.cpp``) on first use.

The extension is compiled with ``torch.utils.cpp_extension.load`` (ninja, g++, OpenMP,
``-O3 -march=native``) into torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``); the build is named after the source and the CPU, so another
CPU model gets its own build. The first build takes about a minute; later processes load
it in a fraction of a second. If it cannot be built (no compiler, no ninja) the runtime
warns once and uses the plain-PyTorch kernels, which compute the same results more slowly.
Set ``REUSE_COMPILER_EXTENSION=0`` to force the plain-PyTorch kernels.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

__all__ = ["get", "enabled", "set_enabled", "fingerprint", "SOURCE", "CFLAGS", "LDFLAGS"]

SOURCE = Path(__file__).with_name("csrc") / "reuse_kernels.cpp"
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
log = logging.getLogger("reuse_compiler")

_module = None
_failed: str | None = None
_enabled = os.environ.get("REUSE_COMPILER_EXTENSION", "1") not in ("0", "false", "no")


def _cpu_tag() -> str:
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    ident += line
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return ident


def _build():
    from torch.utils import cpp_extension

    # One ninja for every process: pip's, next to the venv's python, if there is one (else the
    # one on PATH). A system ninja of another version in some processes (venv not activated)
    # and pip's in others rewrote the build's ninja logs in turn, and each switch rebuilt the
    # kernels (~35 s).
    here = os.path.dirname(sys.executable)
    if os.access(os.path.join(here, "ninja"), os.X_OK) or shutil.which("ninja") is None:
        path = os.environ.get("PATH", "")
        if path.split(os.pathsep)[:1] != [here]:
            os.environ["PATH"] = here + os.pathsep + path
    src = SOURCE.read_bytes()
    # one build directory per source, CPU, checkout and interpreter: two checkouts (or venvs)
    # sharing ~/.cache/torch_extensions rewrote one build.ninja in turn and rebuilt (~35 s) at
    # every switch
    where = f"{SOURCE.resolve()}|{sys.executable}"
    tag = hashlib.sha1(src + _cpu_tag().encode() + where.encode()).hexdigest()[:12]
    log.info("reuse-compiler: building the C++ kernels (first use on this machine, about a minute)")
    return cpp_extension.load(
        name=f"reuse_kernels_{tag}",
        sources=[str(SOURCE)],
        extra_cflags=CFLAGS,
        extra_ldflags=LDFLAGS,
        verbose=False,
    )


def get():
    """The loaded extension module, or None (disabled, or the build failed)."""
    global _module, _failed
    if not _enabled:
        return None
    if _module is None and _failed is None:
        try:
            _module = _build()
        except Exception as e:  # no compiler / ninja / headers: fall back, say so once
            _failed = f"{type(e).__name__}: {e}"
            warnings.warn(
                f"reuse-compiler: the C++ kernels could not be built ({_failed.splitlines()[0][:300]}); "
                "using the plain-PyTorch kernels (same results, slower). Install a C++ compiler and "
                "`pip install ninja` to get the fast path.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _module


_fingerprints: dict[bool, str] = {}


def fingerprint() -> str:
    """Which kernels run: a hash of the runtime's sources (the C++ kernels and the Python
    modules that drive them) and whether the C++ build is in use. Timings measured under
    one fingerprint (the measured policy's calibration cache) are not reused under another,
    e.g. after an upgrade that changed the kernels."""
    on = get() is not None
    if on not in _fingerprints:
        h = hashlib.sha1(b"ext" if on else b"torch")
        for path in (SOURCE, *(Path(__file__).with_name(n) for n in ("kernels.py", "ops.py", "geometry.py"))):
            h.update(path.read_bytes())
        _fingerprints[on] = h.hexdigest()[:16]
    return _fingerprints[on]


def enabled() -> bool:
    return _enabled


def set_enabled(flag: bool) -> bool:
    """Turn the C++ kernels on or off (for tests and benchmarks); returns the old value."""
    global _enabled
    old, _enabled = _enabled, bool(flag)
    return old


@contextlib.contextmanager
def disabled():
    """The plain-PyTorch kernels inside the block (the oracle the C++ kernels are tested against)."""
    old = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(old)
