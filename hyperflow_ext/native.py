"""The one place that imports compiled code (the C++/CUDA extension) and ``triton``.

Nothing here raises or prints at import time. A missing or broken build is remembered and
reported by :func:`available` / :func:`diagnostics`; calls that need it raise
:class:`RuntimeError` with the original error attached, and automatic back-end selection
falls back to the pure-torch reference with a single warning.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from types import ModuleType
from typing import Dict, Iterator, Optional

import torch

__all__ = [
    "available", "cuda_built", "cuda_available", "triton_available", "diagnostics",
    "cpu_module", "cuda_module", "triton", "resolve_backend", "BACKENDS",
    "isa", "isa_paths", "set_isa", "use_isa", "cpu_model",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "native", "torch")


def _try_import(name: str):
    try:
        return importlib.import_module(name), None
    except (ImportError, OSError) as exc:  # OSError: a shared library that fails to load
        return None, exc


def _import_cpu():
    """``hyperflow_ext._C``, or the build named by ``$HYPERFLOW_NATIVE_CPU`` (a path to a ``_C*.so``).

    The override lets a second build of the same sources (the sanitised one of ``.ci/sanitize.sh``)
    stand in for the installed module without touching the installation.
    """
    path = os.environ.get("HYPERFLOW_NATIVE_CPU", "")
    if not path:
        return _try_import("hyperflow_ext._C")
    try:
        if not os.path.isfile(path):
            raise ImportError(f"HYPERFLOW_NATIVE_CPU={path!r} is not a file")
        spec = importlib.util.spec_from_file_location("hyperflow_ext._C", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"HYPERFLOW_NATIVE_CPU={path!r} is not an extension module")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["hyperflow_ext._C"] = module
        return module, None
    except (ImportError, OSError) as exc:
        return None, exc


_cpu, _cpu_error = _import_cpu()


@functools.lru_cache(maxsize=None)
def _load_cuda():
    # Lazy: the CUDA module links the runtime statically and needs no driver to import, but
    # there is no reason to pay for loading it unless CUDA is used.
    return _try_import("hyperflow_ext._C_cuda")


@functools.lru_cache(maxsize=None)
def _load_triton():
    return _try_import("triton")


def available() -> bool:
    """True when the CPU native extension ``hyperflow_ext._C`` loaded."""
    return _cpu is not None


def cuda_built() -> bool:
    """True when the CUDA extension was compiled into this installation."""
    return _load_cuda()[0] is not None


def cuda_available() -> bool:
    """True when CUDA kernels can actually run: built, and a CUDA device is visible to torch."""
    return cuda_built() and torch.cuda.is_available()


def triton_available() -> bool:
    """True when ``triton`` imports (it runs on CPU tensors only under ``TRITON_INTERPRET=1``)."""
    return _load_triton()[0] is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_MISSING_BUILD = """hyperflow_ext: the native extension {name} could not be loaded.
Likely causes: the package was installed without compiling csrc/ (e.g. copied sources), the
compiler failed, or the shared library is for another Python.
Fixes:
  1. reinstall from the source tree: pip install --force-reinstall .
  2. in a development checkout: python setup.py build_ext --inplace
  3. use backend="torch" to run the pure-PyTorch reference instead.
Original error: {error!r}"""


def cpu_module() -> ModuleType:
    """The CPU extension module; raises :class:`RuntimeError` with the load error if missing."""
    if _cpu is None:
        raise RuntimeError(_MISSING_BUILD.format(name="hyperflow_ext._C", error=_cpu_error))
    return _cpu


def isa() -> str:
    """The ISA path the native CPU kernels run on: ``"avx512"``, ``"avx2"`` or ``"baseline"``.

    The extension compiles every CPU kernel once per path and picks one at its first use: the one
    ``$HYPERFLOW_ISA`` names, else the best this CPU supports.

    Raises:
        RuntimeError: the extension is missing, or was built before ISA dispatch (rebuild it).
        ValueError: ``$HYPERFLOW_ISA`` names an unknown path or one this CPU lacks (every native CPU
            call raises the same, rather than silently running another path).
    """
    mod = cpu_module()
    if not hasattr(mod, "isa"):
        raise RuntimeError(f"hyperflow_ext: the native module {getattr(mod, '__file__', '?')} predates runtime ISA "
                           f"dispatch; rebuild it (pip install . or python setup.py build_ext --inplace)")
    return str(mod.isa())


def isa_paths() -> Dict[str, bool]:
    """Every ISA path this build holds (best first) -> whether this CPU can run it ({} for a module built
    before ISA dispatch)."""
    mod = cpu_module()
    if not hasattr(mod, "isa_compiled"):
        return {}
    return {name: bool(mod.isa_supported(name)) for name in mod.isa_compiled()}


def set_isa(name: str) -> None:
    """Make ``name`` the active ISA path of the native CPU kernels for this process.

    For tests and benchmarks; calls already running finish on the path they started with.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: unknown path, or one this CPU lacks.
    """
    if not isinstance(name, str):
        raise TypeError(f"set_isa: name must be a str, got {type(name).__name__}")
    cpu_module().isa_select(name)


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[str]:
    """Run the block on ISA path ``name``, then restore the previous path.

    Example:
        >>> with hyperflow_ext.native.use_isa("avx2"):  # doctest: +SKIP
        ...     y = hyperflow_ext.sparse.csr_linear(x, w)
    """
    previous = isa()
    set_isa(name)
    try:
        yield name
    finally:
        set_isa(previous)


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else :func:`platform.processor`), for benchmark records."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def cuda_module() -> ModuleType:
    """The CUDA extension module; raises :class:`RuntimeError` if it was not built or failed."""
    mod, err = _load_cuda()
    if mod is None:
        if err is None or isinstance(err, ModuleNotFoundError):
            raise RuntimeError(
                "hyperflow_ext: CUDA kernels were not built into this installation "
                "(nvcc was not found at build time, or HYPERFLOW_CUDA=0). Rebuild with "
                f"HYPERFLOW_CUDA=1 pip install . to require them. Original error: {err!r}")
        raise RuntimeError(_MISSING_BUILD.format(name="hyperflow_ext._C_cuda", error=err))
    return mod


def triton() -> ModuleType:
    mod, err = _load_triton()
    if mod is None:
        raise RuntimeError(f"hyperflow_ext: triton is not importable: {err!r}")
    return mod


_warned_fallback = False


def resolve_backend(backend: Optional[str], device: torch.device, op: str,
                    triton_ok: bool = True) -> str:
    """Pick the concrete back-end for one call.

    Args:
        backend: ``"auto"``, ``"triton"``, ``"native"``, ``"torch"`` or ``None`` (then
            ``$HYPERFLOW_BACKEND`` or ``"auto"``).
        device: the device of the operands.
        op: operation name, for messages.
        triton_ok: whether ``op`` has a Triton implementation.

    Returns:
        One of ``"triton"``, ``"native"``, ``"torch"``.

    Raises:
        ValueError: unknown back-end name.
        RuntimeError: an explicitly requested back-end is unavailable (with the original error).
    """
    global _warned_fallback
    backend = backend or os.environ.get("HYPERFLOW_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_ok:
            raise NotImplementedError(f"{op}: no Triton implementation; use 'native' or 'torch'")
        triton()
        if device.type != "cuda" and not triton_interpret():
            raise RuntimeError(f"{op}: the Triton back-end needs CUDA tensors, or TRITON_INTERPRET=1 "
                               f"for CPU tensors (got device {device})")
        return "triton"
    if backend == "native":
        if device.type == "cuda":
            cuda_module()
        else:
            cpu_module()
        return "native"
    # auto
    if device.type == "cuda":
        if triton_ok and triton_available():
            return "triton"
        if cuda_built():
            return "native"
    elif device.type == "cpu" and available():
        return "native"
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"hyperflow_ext: native kernels unavailable for {device.type} tensors; "
                      f"using the pure-PyTorch reference (run `hyperflow info` for details)",
                      RuntimeWarning, stacklevel=3)
    return "torch"


def diagnostics() -> Dict[str, object]:
    """What loaded and why not; used by ``hyperflow info``."""
    cuda_mod, cuda_err = _load_cuda()
    tri, tri_err = _load_triton()
    info: Dict[str, object] = {
        "native_cpu": available(),
        "native_cpu_error": None if _cpu is None and _cpu_error is None else (repr(_cpu_error) if _cpu_error else None),
        "cuda_built": cuda_built(),
        "cuda_error": repr(cuda_err) if cuda_err else None,
        "cuda_available": cuda_available(),
        "torch": torch.__version__,
        "torch_cuda": torch.cuda.is_available(),
        "triton": getattr(tri, "__version__", None),
        "triton_error": repr(tri_err) if tri_err else None,
        "triton_interpret": triton_interpret(),
    }
    if _cpu is not None:
        info["openmp_threads"] = int(_cpu.omp_max_threads())
        info["native_build"] = str(_cpu.build_info())
        info["native_cpu_path"] = getattr(_cpu, "__file__", None)
        try:
            info["isa"] = isa()
        except (ValueError, RuntimeError) as exc:  # a bad $HYPERFLOW_ISA or a stale build: shown, not raised
            info["isa"] = f"error: {exc}"
        info["isa_paths"] = ", ".join(f"{k} ({'supported' if v else 'not supported by this CPU'})"
                                      for k, v in isa_paths().items())
        info["cpu_model"] = cpu_model()
    if cuda_mod is not None:
        info["cuda_build"] = str(cuda_mod.build_info())
    return info
