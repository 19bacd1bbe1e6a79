"""Build script for anyflow: the pure-Python package plus an optional compiled extension ``anyflow._C``.

The extension is built only when torch is importable at build time (so always use
``pip install --no-build-isolation``): a ``CppExtension`` from ``csrc/*.cpp`` (op schemas, argument
checks) and ``csrc/cpu/*.cpp`` (CPU twins of the kernels) everywhere, and a ``CUDAExtension`` that adds
the torch-free kernels ``csrc/kernels/*.cu`` and their CUDA registrations ``csrc/cuda/*.cpp`` when torch
is a CUDA build or ``ANYFLOW_BUILD_CUDA=1``.
Any failure while configuring or compiling it prints a warning and the install goes on without it
(the pure-Python/Triton paths still work); the reason is recorded in ``anyflow/_build_info.py``, with the
source folder, and ``import anyflow`` / ``anyflow env`` print it in one line with the command that adds
the extension. Under build isolation (plain ``pip install .``) torch is not importable, so that is what
happens; pip shows the build's own line only with ``-v``.

Environment variables:
    ANYFLOW_BUILD_CUDA: ``1`` forces the CUDA extension, ``0`` builds the CPU extension only; unset
        means "CUDA when ``torch.version.cuda`` is set".
    ANYFLOW_CUDA_ARCHS: CUDA architectures separated by ``;``, ``,`` or spaces; ``+PTX`` on an entry
        also embeds its PTX. Default ``90a+PTX``.
    MAX_JOBS: parallel compile jobs (read by torch's ninja build).
"""

import glob
import os
import re
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "anyflow._C"
BUILD_INFO_FILE = "_build_info.py"
DEFAULT_CUDA_ARCHS = "90a+PTX"


def _read_version() -> str:
    with open(os.path.join(ROOT, "anyflow", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError("__version__ not found in anyflow/__init__.py")
    return match.group(1)


def _warn(message: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (anyflow): {message}\n{bar}\n", file=sys.stderr, flush=True)


def _cuda_arch_flags(spec: str) -> list:
    """nvcc ``-gencode`` flags for an ``ANYFLOW_CUDA_ARCHS`` value such as ``"80;90a+PTX"``."""
    flags = []
    for entry in re.split(r"[;,\s]+", spec.strip()):
        if not entry:
            continue
        arch, ptx = (entry[: -len("+PTX")], True) if entry.upper().endswith("+PTX") else (entry, False)
        arch = arch.replace(".", "")
        if not re.fullmatch(r"\d+[af]?", arch):
            raise ValueError(f"ANYFLOW_CUDA_ARCHS: expected entries like '90a' or '90a+PTX', got {entry!r}")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    if not flags:
        raise ValueError(f"ANYFLOW_CUDA_ARCHS is empty: {spec!r}")
    return flags


def _want_cuda(torch) -> bool:
    flag = os.environ.get("ANYFLOW_BUILD_CUDA", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    return bool(torch.version.cuda)


def _extensions_and_cmdclass():
    """The ``anyflow._C`` extension (or none) and the build_ext class that builds it optionally."""
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # no torch at build time (pip's build isolation): pure-Python install
        reason = f"torch was not importable at build time: {type(exc).__name__}, pip build isolation?"
        print(f"anyflow: building without {EXT_NAME} ({reason}); add it with: pip install --no-build-isolation --no-deps "
              f"--force-reinstall {ROOT}", file=sys.stderr)
        return [], {"build_py": _build_py_recording(reason)}

    def sources(*pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", *pattern)))

    # Always: the schemas/module (csrc/*.cpp) and the CPU twins (csrc/cpu). CUDA build only: the
    # torch-free kernels (csrc/kernels/*.cu) and their CUDA registrations (csrc/cuda/*.cpp).
    cpp_sources = sources("*.cpp") + sources("cpu", "*.cpp")
    cuda_cpp_sources = sources("cuda", "*.cpp")
    cu_sources = sources("kernels", "*.cu")
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "kernels")]
    cxx_flags = ["-O3"]
    ext = None
    cuda_version = None  # the CUDA toolkit version the extension is compiled with, None for CPU only
    if _want_cuda(torch):
        try:
            nvcc_flags = ["-O3", "-lineinfo"] + _cuda_arch_flags(
                os.environ.get("ANYFLOW_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
            )
            ext = cpp_extension.CUDAExtension(
                EXT_NAME,
                cpp_sources + cuda_cpp_sources + cu_sources,
                include_dirs=include_dirs,
                define_macros=[("ANYFLOW_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            )
            cuda_version = torch.version.cuda
        except Exception as exc:
            _warn(f"cannot configure the CUDA extension ({exc}); building the CPU extension only")
    if ext is None:
        ext = cpp_extension.CppExtension(
            EXT_NAME, cpp_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags}
        )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds ``anyflow._C`` if it can; on any failure warns and leaves a pure-Python install.

        Before compiling it writes a header with the torch/CUDA versions (compiled into the module),
        and afterwards ``anyflow/_build_info.py`` with the same versions, which ``anyflow._ext``
        reads to refuse a mismatched build without loading the shared library.
        """

        def run(self):
            info = {
                "built": False,
                "torch_version": torch.__version__,
                "cuda_version": cuda_version,
                "error": None,
                "source": ROOT,
            }
            try:
                self._write_version_header(info)
                super().run()
                info["built"] = True
            except (Exception, SystemExit) as exc:  # distutils reports some failures via SystemExit
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                info["error"] = f"{type(exc).__name__}: {first_line}"
                self._remove_stale_library()
                _warn(
                    f"building {EXT_NAME} failed; installing without it (pure-Python fallback).\n"
                    f"Reason: {info['error']}"
                )
            self._write_build_info(info)

        def _write_version_header(self, info):
            gen_dir = os.path.join(os.path.abspath(self.build_temp), "anyflow_generated")
            os.makedirs(gen_dir, exist_ok=True)
            text = (
                "// Generated by setup.py: the versions anyflow._C is compiled against.\n"
                "#pragma once\n"
                f'#define ANYFLOW_BUILD_TORCH_VERSION "{info["torch_version"]}"\n'
                f'#define ANYFLOW_BUILD_CUDA_VERSION "{info["cuda_version"] or "cpu"}"\n'
            )
            _write_if_changed(os.path.join(gen_dir, "anyflow_build_info.h"), text)
            for e in self.extensions:
                if gen_dir not in e.include_dirs:
                    e.include_dirs.append(gen_dir)

        def _remove_stale_library(self):
            # An older build left in build/lib would otherwise be packaged next to the failure record.
            old_inplace, self.inplace = self.inplace, False
            try:
                stale = self.get_ext_fullpath(EXT_NAME)
            finally:
                self.inplace = old_inplace
            if os.path.exists(stale):
                os.remove(stale)

        def _write_build_info(self, info):
            text = (
                '"""Generated by setup.py at build time: what anyflow._C was compiled against. Do not edit."""\n\n'
                f"BUILD_INFO = {info!r}\n"
            )
            package_dirs = {os.path.join(os.path.abspath(self.build_lib), "anyflow")}
            if self.inplace or getattr(self, "editable_mode", False):
                package_dirs.add(os.path.join(ROOT, "anyflow"))
            for d in package_dirs:
                os.makedirs(d, exist_ok=True)
                _write_if_changed(os.path.join(d, BUILD_INFO_FILE), text)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


def _build_py_recording(reason: str):
    """build_py that writes ``_build_info.py`` saying why there is no anyflow._C (and so replaces any
    stale copy from an earlier in-tree build)."""
    from setuptools.command.build_py import build_py

    class RecordingBuildPy(build_py):
        def run(self):
            super().run()
            info = {"built": False, "skipped": True, "torch_version": None, "cuda_version": None, "error": reason,
                    "source": ROOT}
            path = os.path.join(self.build_lib, "anyflow", BUILD_INFO_FILE)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(
                    '"""Generated by setup.py at build time: what anyflow._C was compiled against. Do not edit."""\n\n'
                    f"BUILD_INFO = {info!r}\n"
                )

    return RecordingBuildPy


def _write_if_changed(path: str, text: str) -> None:
    """Write ``text`` unless the file already holds it (keeps ninja from rebuilding needlessly)."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


ext_modules, cmdclass = _extensions_and_cmdclass()

setup(
    version=_read_version(),
    packages=find_packages(include=["anyflow", "anyflow.*"]),
    # the shipped default model (anyflow.default_model)
    package_data={"anyflow": ["assets/*/*.json", "assets/*/*/*.json", "assets/*/*/*.safetensors"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
