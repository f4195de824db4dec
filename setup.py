"""Builds esc_runtime's native CPU kernels when the package is built (``pip install``, ``pip install -e``, a wheel).

The kernels (``esc_runtime/kernels``: plain C ABI, no Python or torch headers) are compiled once per instruction-set
variant (AVX-512 and AVX2 + FMA; ``kernels/target.h``) into one library, ``esc_runtime/_esc_kernels.so``, loaded by
``esc_runtime/native.py`` with ctypes. Beside it the build writes ``esc_runtime/_esc_kernels.json``: the library's
SHA-256 (checked before it is loaded), the digest of the sources it was built from, its variants, or, where nothing
was built, why. The build is optional: on another platform, without a C++ compiler (``$CXX``, else ``c++``) or when
the compiler fails, the package installs without the library and runs torch's operators.

Everything else about the package is in ``pyproject.toml``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NAME = "esc_runtime._esc_kernels"
LIBRARY = "_esc_kernels.so"
MANIFEST = "_esc_kernels.json"
KERNELS = Path("esc_runtime", "kernels")
SOURCES = ["window_attention.cpp", "conv_ffn.cpp", "symmetric_conv.cpp", "linear_rows.cpp"]
#: Variant -> (its bit in esc_kernel_variants(), its macro): see kernels/target.h and kernels/library.cpp.
VARIANTS = {"avx512": (2, "ESC_VARIANT_AVX512"), "avx2": (1, "ESC_VARIANT_AVX2")}
# No -march: the baseline (x86-64) is what every object's standard-library code is compiled for; each variant's own
# code sets its target by a pragma (target.h). -fopenmp: the kernels' threads are OpenMP's; loaded after torch, the
# library shares torch's libgomp.so.1 and so its thread pool. $CXXFLAGS is not read: a -march=native there would make
# the shared code AVX-512 on an AVX-512 build machine and the AVX2 variant unsafe elsewhere.
FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-fvisibility=hidden", "-Wno-psabi"]


def sources_digest(folder: Path) -> str:
    """SHA-256 over the kernel sources and headers (names and contents): what a library was built from. The same
    function is in esc_runtime/native.py, which refuses a library built from other sources."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".cpp", ".h")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


#: What the system says when it refuses (``No space left on device``, ``Permission denied``, ...): a compiler's or
#: linker's line holding one of these is the cause, whatever follows it.
OS_REASONS = tuple(sorted({os.strerror(code) for code in errno.errorcode} - {"Unknown error", "Success"}, key=len,
                          reverse=True))
#: Lines that only report that a step failed ("collect2: error: ld returned 1 exit status"), not why.
AFTERMATH = ("returned 1 exit status", "compilation terminated", "error: ld returned")


def _reason(text: str) -> str:
    """Why a compiler or linker run failed, from its stderr: the first line naming a refusal of the system (a full
    disk: the linker's "final link failed: No space left on device", followed by collect2's summary), else the first
    error that is not only a summary, else the first line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    system = [line for line in lines if any(reason.lower() in line.lower() for reason in OS_REASONS)]
    errors = [line for line in lines if "error" in line.lower() and not any(a in line for a in AFTERMATH)]
    return ((system or errors or lines or ["no output"])[0])[:300]


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole or not at all: a process that maps the old file keeps it (never a truncated one)."""
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(scratch, mode)
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def build_kernels(sources: Path, log=print) -> tuple[bytes | None, dict]:
    """Compile the kernels; return the library's bytes (None where nothing was built) and its manifest."""
    record = {"built": False, "sources": sources_digest(sources)}
    machine = platform.machine().lower()
    if not (sys.platform.startswith("linux") and machine in ("x86_64", "amd64")):
        return None, {**record, "reason": f"{sys.platform}/{machine}: the kernels are built for x86-64 Linux only"}
    command = shlex.split(os.environ.get("CXX") or "c++")
    if not command or shutil.which(command[0]) is None:
        return None, {**record, "reason": f"no C++ compiler ({' '.join(command) or 'c++'} not found; set CXX)"}
    try:
        version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return None, {**record, "reason": f"{command[0]} does not run: {error}"}
    record["compiler"] = (version.strip().splitlines() or ["?"])[0]

    with tempfile.TemporaryDirectory(prefix="esc_kernels_") as scratch:
        def compile_one(job: tuple[str, str, list[str]]) -> str | None:
            source, target, defines = job
            result = subprocess.run([*command, *FLAGS, *defines, "-c", str(sources / source), "-o", target],
                                    capture_output=True, text=True, timeout=900)
            return None if result.returncode == 0 else _reason(result.stderr)

        jobs = {variant: [(source, os.path.join(scratch, f"{Path(source).stem}.{variant}.o"), [f"-D{macro}"])
                          for source in SOURCES] for variant, (_, macro) in VARIANTS.items()}
        log(f"esc_runtime: compiling the native CPU kernels ({', '.join(VARIANTS)}) with {record['compiler']}")
        with ThreadPoolExecutor(max_workers=max(1, min(len(SOURCES) * len(VARIANTS), os.cpu_count() or 1))) as pool:
            errors = {variant: list(pool.map(compile_one, variant_jobs)) for variant, variant_jobs in jobs.items()}
        built = [variant for variant in VARIANTS if not any(errors[variant])]
        failed = {variant: next(e for e in errors[variant] if e) for variant in VARIANTS if variant not in built}
        for variant, error in failed.items():
            log(f"esc_runtime: the {variant} variant of the kernels did not compile: {error}")
        if not built:
            return None, {**record, "reason": f"{command[0]} failed: {next(iter(failed.values()))}"}
        mask = sum(VARIANTS[variant][0] for variant in built)
        library_object = os.path.join(scratch, "library.o")
        objects = [target for variant in reversed(built) for _, target, _ in jobs[variant]] + [library_object]
        library = os.path.join(scratch, LIBRARY)
        steps = ([*command, *FLAGS, f"-DESC_BUILT_VARIANTS={mask}", "-c", str(sources / "library.cpp"), "-o",
                  library_object], [*command, *FLAGS, "-shared", *objects, "-o", library])
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                return None, {**record, "reason": f"{command[0]} failed: {_reason(result.stderr)}"}
        data = Path(library).read_bytes()
    return data, {**record, "built": True, "library": LIBRARY, "sha256": hashlib.sha256(data).hexdigest(),
                  "variants": built, "not_built": failed}


class BuildKernels(build_ext):
    """build_ext for the one "extension", the kernels' library: compiled by :func:`build_kernels` (never failing the
    installation), named ``_esc_kernels.so`` (not a Python module: no ABI tag), its manifest beside it; in place for
    an editable install, each file replaced atomically (other processes may have the old library mapped)."""

    def get_ext_filename(self, fullname: str) -> str:
        if fullname in (NAME, NAME.rpartition(".")[2]):  # distutils asks for the last part alone too
            return os.path.join(*fullname.split(".")[:-1], LIBRARY)
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        if ext.name != NAME:
            return super().build_extension(ext)
        library = Path(self.get_ext_fullpath(ext.name))
        library.parent.mkdir(parents=True, exist_ok=True)
        try:
            data, manifest = build_kernels(KERNELS, log=lambda message: print(message, file=sys.stderr))
        except Exception as error:  # noqa: BLE001 - a failed build leaves a working package (torch's operators)
            data, manifest = None, {"built": False, "reason": f"the build failed: {error!r}"[:300]}
        if data is None:
            print(f"esc_runtime: native CPU kernels not built ({manifest['reason']}); torch's operators will run",
                  file=sys.stderr)
            library.unlink(missing_ok=True)
        else:
            _write_atomically(library, data, 0o755)
        _write_atomically(library.with_name(MANIFEST), (json.dumps(manifest, indent=1) + "\n").encode(), 0o644)

    def copy_extensions_to_source(self) -> None:
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            if ext.name != NAME:
                continue
            inplace, regular = (Path(p) for p in self._get_inplace_equivalent(build_py, ext))
            for name in (LIBRARY, MANIFEST):
                source, target = regular.with_name(name), inplace.with_name(name)
                if source.exists():
                    _write_atomically(target, source.read_bytes(), source.stat().st_mode & 0o777)
                else:  # not built this time: no library from an earlier build stays behind
                    target.unlink(missing_ok=True)

    def _get_output_mapping(self):
        for regular, inplace in super()._get_output_mapping():
            yield regular, inplace
            if os.path.basename(regular) == LIBRARY:
                yield (os.path.join(os.path.dirname(regular), MANIFEST),
                       os.path.join(os.path.dirname(inplace), MANIFEST))

    def get_outputs(self) -> list[str]:
        outputs = super().get_outputs()
        if not self.inplace:
            outputs += [os.path.join(os.path.dirname(p), MANIFEST) for p in outputs if os.path.basename(p) == LIBRARY]
        return outputs


setup(
    ext_modules=[Extension(NAME, sources=[str(KERNELS / source) for source in SOURCES], optional=True)],
    cmdclass={"build_ext": BuildKernels},
)
