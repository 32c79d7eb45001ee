"""Build script: compiles csrc/ into hyperflow_ext._C (CPU, always) and hyperflow_ext._C_cuda
(CUDA, when nvcc is found) with ninja. Neither module links libtorch, so the build needs only
setuptools, pybind11 and ninja, and the result works with any installed torch.

The CPU kernels (csrc/cpu/*.cpp) are compiled once per ISA path listed in csrc/isa_flags.txt
(avx512, avx2, baseline), each with only that path's flags, and csrc/dispatch.cpp picks one at run
time by CPU features (or $HYPERFLOW_ISA): the default build runs on any x86-64 CPU.

Environment:
    HYPERFLOW_CUDA       auto (default) | 0 | 1   — 1 fails when nvcc is missing
    HYPERFLOW_CUDA_ARCH  e.g. "80;90" (default "75;80;86;89;90", plus PTX for the newest)
    HYPERFLOW_MARCH      -march value for the generic CPU code and the baseline path (default: none,
                         i.e. portable x86-64). "native" tunes them for the build machine, whose
                         instructions the module then needs: a non-portable build.
    CUDA_HOME            CUDA toolkit root (else found from nvcc on PATH or /usr/local/cuda)
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "75;80;86;89;90"


def isa_flags() -> dict[str, str]:
    """csrc/isa_flags.txt: ISA path name -> its compiler flags, best first."""
    table = {}
    for line in (CSRC / "isa_flags.txt").read_text().splitlines():
        line = line.split("#", 1)[0].split()
        if line:
            table[line[0]] = " ".join(line[1:])
    return table


def find_cuda_home() -> Path | None:
    """The CUDA toolkit root: $CUDA_HOME, the toolkit of nvcc on PATH, or /usr/local/cuda."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return home
    return None


def cuda_requested() -> bool:
    mode = os.environ.get("HYPERFLOW_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"HYPERFLOW_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    found = find_cuda_home() is not None
    if mode == "1" and not found:
        raise RuntimeError("HYPERFLOW_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    return found


def ninja_binary() -> str:
    try:
        import ninja  # the PyPI package ships the binary
        return os.path.join(ninja.BIN_DIR, "ninja")
    except (ImportError, AttributeError):
        exe = shutil.which("ninja")
        if exe is None:
            raise RuntimeError("ninja not found: pip install ninja")
        return exe


def q(p) -> str:
    """Quote a path for a ninja command line (ninja escapes $, :, space with $)."""
    return str(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


class NinjaBuildExt(build_ext):
    """Writes one build.ninja per extension and lets ninja compile in parallel, incrementally."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        build_dir = Path(self.build_temp).resolve() / ext.name.replace(".", "_")
        build_dir.mkdir(parents=True, exist_ok=True)
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)

        includes = [CSRC / "include", CSRC, pybind11.get_include(), sysconfig.get_paths()["include"]]
        inc = " ".join(f"-I{shlex.quote(str(p))}" for p in includes)
        march = os.environ.get("HYPERFLOW_MARCH", "")
        cxxflags = f"-std=c++17 -O3 -fPIC -fvisibility=hidden -fopenmp -Wall -Wno-unknown-pragmas {inc}"
        marchflags = f"-march={shlex.quote(march)} -DHF_MARCH='\"{march}\"'" if march else ""
        ldflags = "-shared -fopenmp"
        rules = [
            f"cxx = {os.environ.get('CXX', 'c++')}",
            f"cxxflags = {cxxflags}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cxxflags $isaflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = CXX $out",
        ]
        objects, builds = [], []
        for src in ext.sources:
            obj = build_dir / (Path(src).name + ".o")
            rule = "nvcc" if src.endswith(".cu") else "cxx"
            builds.append(f"build {q(obj)}: {rule} {q(ROOT / src)}")
            if rule == "cxx":
                builds.append(f"  isaflags = {marchflags}")
            objects.append(obj)
        # The per-ISA kernel sources: each compiled once per ISA path, with only that path's flags
        # (HYPERFLOW_MARCH reaches the baseline path alone).
        for isa, flags in (isa_flags().items() if getattr(ext, "isa_sources", None) else ()):
            for src in ext.isa_sources:
                obj = build_dir / isa / (Path(src).name + ".o")
                builds.append(f"build {q(obj)}: cxx {q(ROOT / src)}")
                builds.append(f"  isaflags = -DHF_ISA={isa} {flags or marchflags}")
                objects.append(obj)

        if ext.name.endswith("_C_cuda"):
            cuda_home = find_cuda_home()
            archs = [a.strip() for a in os.environ.get("HYPERFLOW_CUDA_ARCH", DEFAULT_ARCHS).split(";") if a.strip()]
            gencode = " ".join(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs)
            gencode += f" -gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"
            rules += [
                f"nvcc = {cuda_home / 'bin' / 'nvcc'}",
                f"nvccflags = -std=c++17 -O3 --use_fast_math -Xcompiler -fPIC -Xcompiler -fvisibility=hidden {gencode} {inc}",
                "rule nvcc",
                "  command = $nvcc -MD -MF $out.d $nvccflags -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
                "  description = NVCC $out",
            ]
            rules[1] += f" -I{cuda_home / 'include'} -DHF_CUDA_ARCHS='\"{';'.join(archs)}\"'"
            libdir = cuda_home / "lib64"
            if not libdir.exists():
                libdir = cuda_home / "targets" / "x86_64-linux" / "lib"
            # Static runtime: the module loads without libcudart on the user's machine.
            ldflags += f" -L{libdir} -lcudart_static -ldl -lrt -lpthread"

        rules += [
            f"ldflags = {ldflags}",
            "rule link",
            "  command = $cxx $in -o $out $ldflags",
            "  description = LINK $out",
        ]
        builds.append(f"build {q(out)}: link {' '.join(q(o) for o in objects)}")
        (build_dir / "build.ninja").write_text("\n".join(rules + builds) + "\n")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        cmd = [ninja_binary(), "-C", str(build_dir), "-j", jobs]
        if os.environ.get("HYPERFLOW_VERBOSE_BUILD"):
            cmd.append("-v")
        print(f"[hyperflow] building {ext.name} with ninja in {build_dir}", flush=True)
        subprocess.run(cmd, check=True)


def sources(*patterns: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for pat in patterns for p in ROOT.glob(pat))


cpu_ext = Extension("hyperflow_ext._C", sources("csrc/module_cpu.cpp", "csrc/dispatch.cpp"))
cpu_ext.isa_sources = sources("csrc/cpu/*.cpp")  # compiled once per ISA path (NinjaBuildExt)
ext_modules = [cpu_ext]
if cuda_requested():
    ext_modules.append(Extension("hyperflow_ext._C_cuda", sources("csrc/module_cuda.cpp", "csrc/cuda/*.cu")))
else:
    print("[hyperflow] nvcc not found or HYPERFLOW_CUDA=0: building the CPU extension only", file=sys.stderr)

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": NinjaBuildExt},
    # Triton kernels live in kernels/ but install as hyperflow_ext.kernels.
    packages=find_packages(include=["hyperflow_ext", "hyperflow_ext.*"]) + ["hyperflow_ext.kernels"],
    package_dir={"hyperflow_ext.kernels": "kernels"},
)
