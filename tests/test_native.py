"""The native CPU kernels (``esc_runtime.native``): built when the package is built, one library with an AVX-512 and an
AVX2 variant; each variant equal to float64 references; loaded only after its checks, so that a planted, truncated,
foreign or exposed library is refused (in a fresh process, with one warning, and torch's operators run instead); and
out of the way, with the reason stated and no warning, where there is no library or no variant the CPU runs; and
which kernels run by default on each variant (by measurement), with the reason in the report."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import esc_arch
import esc_runtime
from esc_arch.attention import relative_position_index
from esc_arch.layers import LayerNorm2d, geometric_ensemble
from esc_runtime import native

REPO = Path(__file__).resolve().parent.parent
#: Where setup.py builds the library: x86-64 Linux.
BUILT_FOR = sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")
RECORD_PATH = native.LIBRARY.with_name(native.MANIFEST_NAME)
RECORD = json.loads(RECORD_PATH.read_text()) if RECORD_PATH.exists() else None
BUILT = bool(RECORD and RECORD.get("built")) and native.LIBRARY.exists()
NOT_BUILT = f"the library was not built at install here ({(RECORD or {}).get('reason', 'no build record')})"
CPU = f"{platform.machine()} CPU that runs {' and '.join(native.cpu_variants()) or 'none of the variants'}"


def _compiler() -> str | None:
    """The compiler setup.py would use, if it is on PATH."""
    return shutil.which((os.environ.get("CXX") or "c++").split()[0])


# --- the build, and the default choice ------------------------------------------------------------------------------

def test_the_library_is_built_at_install_wherever_it_can_be() -> None:
    """On x86-64 Linux with a C++ compiler (this project's machines and CI) `pip install` (editable or not) must have
    built both variants from the sources as they are now: the kernel tests below can then be skipped only for a CPU
    that lacks a variant, never because a build broke or is stale. Elsewhere the build record says why not."""
    if BUILT_FOR and _compiler() is not None:
        assert RECORD is not None, f"no {RECORD_PATH.name}: run pip install -e . to build the kernels"
        assert RECORD["built"], f"the build failed: {RECORD.get('reason')}"
        assert native.LIBRARY.is_file() and RECORD["variants"] == list(native.VARIANTS), RECORD
        assert RECORD["sources"] == native.sources_digest(), "built from other sources: run pip install -e . again"
    elif not BUILT:
        assert not native.available() and native.status().startswith(("not built", "switched off"))


def test_every_kernel_file_is_built_and_shipped() -> None:
    """setup.py compiles every source (the four kernels per variant, library.cpp once), the build record's digest
    covers every source and header, and the package data ships them all (for builds from an sdist)."""
    files = {p.name for p in native.KERNELS.iterdir() if p.suffix in (".cpp", ".h")}
    setup = (REPO / "setup.py").read_text()
    listed = re.search(r"^SOURCES = \[(.*)\]$", setup, re.M).group(1)
    compiled = {name.strip(' "') for name in listed.split(",")} | {"library.cpp"}
    assert compiled == {name for name in files if name.endswith(".cpp")}
    line = next(row for row in (REPO / "pyproject.toml").read_text().splitlines() if row.startswith("esc_runtime = ["))
    patterns = re.findall(r'"([^"]+)"', line)
    import fnmatch  # noqa: PLC0415

    assert all(any(fnmatch.fnmatch(f"kernels/{name}", pattern) for pattern in patterns) for name in files)


def _setup_functions() -> dict:
    """setup.py's definitions, without running its setup() call."""
    namespace: dict = {"__name__": "setup_under_test", "__file__": str(REPO / "setup.py")}
    exec((REPO / "setup.py").read_text().split("\nsetup(")[0], namespace)  # noqa: S102 - the project's own file
    return namespace


@pytest.mark.skipif(not BUILT_FOR, reason="setup.py builds the kernels on x86-64 Linux only")
def test_a_failed_build_records_the_reason_not_the_last_complaint(tmp_path, monkeypatch) -> None:
    """Issue 26: a link onto a full disk was recorded as "collect2: error: ld returned 1 exit status". A fake compiler
    that compiles and then fails to link as ld does there: the record names the system's reason."""
    compiler = tmp_path / "fake-c++"
    compiler.write_text("#!/bin/sh\n"
                        'case " $* " in *" --version "*) echo "fake c++ 1.0"; exit 0;; esac\n'
                        'case " $* " in *" -shared "*) echo "/usr/bin/ld: final link failed: No space left on device" >&2;'
                        ' echo "collect2: error: ld returned 1 exit status" >&2; exit 1;; esac\n'
                        'out=""; prev=""; for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done\n'
                        ': > "$out"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    setup = _setup_functions()
    data, record = setup["build_kernels"](native.KERNELS, log=lambda message: None)
    assert data is None and not record["built"]
    assert record["reason"] == f"{compiler} failed: /usr/bin/ld: final link failed: No space left on device"
    reason = setup["_reason"]
    assert reason("k.cpp: In function 'f':\nk.cpp:3:1: error: expected ';'\ncompilation terminated.") \
        == "k.cpp:3:1: error: expected ';'"
    assert reason("cc1plus: fatal error: k.cpp: Permission denied\ncompilation terminated.") \
        == "cc1plus: fatal error: k.cpp: Permission denied"


@pytest.mark.skipif(not BUILT, reason=NOT_BUILT)
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (GNU binutils) to disassemble the library")
def test_only_the_avx512_variant_holds_avx512_instructions() -> None:
    """A CPU without AVX-512 runs the AVX2 variant and the code both variants share (the standard library's, the
    OpenMP glue): none of it may hold an AVX-512 (EVEX-encoded, first byte 0x62 in 64-bit mode) instruction."""
    listing = subprocess.run(["objdump", "-d", str(native.LIBRARY)], capture_output=True, text=True,
                             check=True).stdout
    evex: dict[str, int] = {}
    function = "?"
    for line in listing.splitlines():
        if header := re.match(r"^[0-9a-f]+ <(.+)>:$", line):
            function = header.group(1)
        elif (fields := line.split("\t")) and len(fields) >= 3 and re.match(r"((2e|3e|67) )?62 ", fields[1]):
            evex[function] = evex.get(function, 0) + 1
    assert evex, "no AVX-512 instruction at all: the AVX-512 variant is not built for AVX-512"
    assert [name for name in evex if "avx512" not in name] == []


def test_the_default_choice_on_this_cpu() -> None:
    """By default the best variant the CPU runs is loaded (AVX-512, else AVX2: both measured); on a CPU with neither
    the library is not even opened and the status says why; without a library, the build record's reason."""
    select = os.environ.get(native.ENV, "") or ("0" if os.environ.get("ESC_SR_NATIVE") == "0" else "")
    if select:
        pytest.skip(f"{native.ENV}/ESC_SR_NATIVE set in the environment ({select}): the default is not in force")
    if not BUILT_FOR:
        assert native.status().startswith("not built on")
    elif not BUILT:
        assert native.status().startswith("not built at install")
    elif native.cpu_variants():
        best = native.cpu_variants()[0]
        assert native.variant() == best and native.status().startswith(f"{best} variant (the best"), native.status()
        assert not native.forced()
    else:
        assert not native.available() and native.status().startswith("this CPU runs none of the variants")


def test_which_kernels_run_by_default_is_stated_once_per_variant_with_its_reason() -> None:
    """esc_runtime.layers.NATIVE_BY_DEFAULT names, for every kind with a native implementation and every variant, whether
    it runs by default and why (by measurement); the dispatch follows it and the report gives the reason, also for a
    kernel left off; a forced variant runs them all."""
    from esc_runtime.layers import KINDS, NATIVE_BY_DEFAULT, native_default  # noqa: PLC0415

    native_kinds = {kind for kind, impls in KINDS.items() if impls[0].name == "native"}
    assert set(NATIVE_BY_DEFAULT) == native_kinds
    for kind, by_variant in NATIVE_BY_DEFAULT.items():
        assert set(by_variant) == set(native.VARIANTS), kind
        for used, why in by_variant.values():
            assert isinstance(used, bool) and "measured" in why, (kind, why)
    if not BUILT or not native.cpu_variants() or os.environ.get(native.ENV) or os.environ.get("ESC_SR_NATIVE"):
        return
    try:
        native.select(None)
        best = native.variant()
        for kind in native_kinds:
            assert native_default(kind) == NATIVE_BY_DEFAULT[kind][best]
        prepared = esc_runtime.prepare(esc_arch.esc_tiny(2).eval())
        for line in prepared.report():
            kind = line.split(":")[0].split(" x")[0]
            if kind in native_kinds:
                used, why = NATIVE_BY_DEFAULT[kind][best]
                assert (": native [" + why + "]" in line) if used else (f"not native: {why}" in line), line
        with pytest.MonkeyPatch.context() as patch:  # a table that leaves the ConvFFN off on this variant
            patch.setitem(NATIVE_BY_DEFAULT, "ConvFFN", {**NATIVE_BY_DEFAULT["ConvFFN"],
                                                         best: (False, f"{best} variant measured slower (a test)")})
            off = esc_runtime.prepare(esc_arch.esc_tiny(2).eval())
            line = next(line for line in off.report() if line.startswith("ConvFFN"))
            assert ": onednn" in line or ": module" in line, line
            assert f"not native: {best} variant measured slower (a test)" in line, line
            native.select(best)  # forced: every kernel, with the setting as the reason
            assert native.forced() and native_default("ConvFFN") == (True, f"{best} variant, chosen by select({best!r})")
    finally:
        native.select(None)


# --- choosing a variant, and refusing a library ----------------------------------------------------------------------

@pytest.fixture
def environment():
    """The environment as a fresh process would read it, with the choice made again from it after the test."""
    with pytest.MonkeyPatch.context() as patch:
        for name in (native.ENV, "ESC_SR_NATIVE"):
            patch.delenv(name, raising=False)
        yield patch
    native._load_from(native.LIBRARY)


def _choose(patch: pytest.MonkeyPatch, **env: str) -> tuple[str, list[str]]:
    """The status after choosing again from ``env`` (as a new process does), and the RuntimeWarnings on the way."""
    for name, value in env.items():
        patch.setenv(name, value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = native.select(None)
        native.available(), native.status()  # asked again: no second warning
    return status, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_the_environment_switches_the_kernels_off_or_forces_a_variant(environment) -> None:
    assert _choose(environment, ESC_RUNTIME_NATIVE="0") == (f"switched off ({native.ENV}=0)", [])
    assert native.variant() is None and not native.available()
    environment.delenv(native.ENV)
    assert _choose(environment, ESC_SR_NATIVE="0") == ("switched off (ESC_SR_NATIVE=0)", [])  # the older switch
    if BUILT and "avx2" in native.cpu_variants():
        status = f"avx2 variant (chosen by {native.ENV}=avx2) of {native.LIBRARY}"
        assert _choose(environment, ESC_RUNTIME_NATIVE="avx2") == (status, []) and native.variant() == "avx2"


def test_a_variant_the_cpu_lacks_or_a_wrong_name_warns_once_and_runs_torch(environment) -> None:
    """Asked for what cannot be: one warning, torch's operators. Without a library, a variant's name only gets the
    status's reason (nothing to warn about: the platform has no library)."""
    lacking = [name for name in native.VARIANTS if name not in native.cpu_variants()]
    for value in ["sse2", *lacking[:1]]:
        status, warned = _choose(environment, ESC_RUNTIME_NATIVE=value)
        assert not native.available()
        if BUILT_FOR and (BUILT or value not in native.VARIANTS):
            assert len(warned) == 1 and status.startswith(f"refused {native.LIBRARY}: {native.ENV}={value}"), status
            assert str(native.LIBRARY) in warned[0] and f"{native.ENV}={value}" in warned[0]
        elif BUILT_FOR:
            assert status.startswith("not built at install") and not warned, (status, warned)


def test_no_library_built_at_install_is_no_fault(environment, tmp_path) -> None:
    """As after `pip install` without a compiler: the build record says why, nothing warns, torch's operators run."""
    folder = tmp_path / "package"
    folder.mkdir(mode=0o755)
    (folder / native.MANIFEST_NAME).write_text(json.dumps(
        {"built": False, "reason": "no C++ compiler (c++ not found; set CXX)"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = native._load_from(folder / native.LIBRARY.name, "auto")
    if BUILT_FOR:
        assert status == "not built at install (no C++ compiler (c++ not found; set CXX))"
    assert not native.available() and not [w for w in caught if issubclass(w.category, RuntimeWarning)]


_PROBE = """
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, esc_arch, esc_runtime
    from esc_runtime import native
    exec(sys.argv[1])  # the case's own preparation, e.g. native._load_from(...)
    prepared = esc_runtime.prepare(esc_arch.esc_tiny(2).eval())
    with torch.inference_mode():
        out = prepared(torch.rand(1, 3, 20, 24))
    native.status(), native.available()
print(json.dumps({"status": native.status(), "variant": native.variant(), "shape": list(out.shape),
                  "report": prepared.report(),
                  "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}))
"""


def _start(prelude: str = "", env: dict[str, str] | None = None) -> subprocess.Popen:
    """The probe in a fresh interpreter (the library is chosen once per process): an ESC forward pass on a prepared
    model after ``prelude``."""
    clean = {k: v for k, v in os.environ.items() if k not in (native.ENV, "ESC_SR_NATIVE")}
    return subprocess.Popen([sys.executable, "-c", _PROBE, prelude], env={**clean, **(env or {})}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _report(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, f"exit {process.returncode}: {err[-2000:]}"
    report = json.loads(out.strip().splitlines()[-1])
    assert report["shape"] == [1, 3, 40, 48]  # the forward pass ran, natively or on torch's operators
    return report


def _hostile_library(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A copy of the package's library and its build record in a private folder, spoilt as ``case`` says; returns the
    library's path and the refusal's reason as the status gives it."""
    folder = tmp_path / "package"
    folder.mkdir(mode=0o755)
    library, record = folder / native.LIBRARY.name, folder / native.MANIFEST_NAME
    shutil.copy2(native.LIBRARY, library)
    shutil.copy2(RECORD_PATH, record)
    compiler = _compiler()

    def tiny(body: str) -> Path:  # a shared library of our own making
        source, built = tmp_path / "tiny.c", tmp_path / "tiny.so"
        source.write_text(body)
        subprocess.run([compiler, "-x", "c", "-shared", "-fPIC", str(source), "-o", str(built)], check=True,
                       capture_output=True)
        return built

    if case == "intact":  # the control: the same copy, unspoilt
        return library, ""
    if case == "planted":  # a library that, loaded, writes a marker file: it must never be loaded
        marker = tmp_path / "constructor-ran"
        shutil.copy2(tiny('#include <stdio.h>\n__attribute__((constructor)) static void planted(void) '
                          f'{{ FILE* f = fopen("{marker}", "w"); if (f) fclose(f); }}\n'), library)
        return library, "SHA-256 is not the one the build wrote"
    if case == "truncated":  # as a full disk or an interrupted copy leaves it (mapping it was a SIGBUS)
        library.write_bytes(native.LIBRARY.read_bytes()[: library.stat().st_size // 2])
        return library, "SHA-256 is not the one the build wrote"
    if case == "without-symbols":  # a valid ELF, its digest in the record: loaded, then refused for what it lacks
        shutil.copy2(tiny("int unrelated(void) { return 0; }\n"), library)
        manifest = json.loads(record.read_text())
        manifest["sha256"] = hashlib.sha256(library.read_bytes()).hexdigest()
        record.write_text(json.dumps(manifest))
        return library, "it lacks esc_kernel_variants"
    if case == "group-writable-folder":
        folder.chmod(0o775)
        return library, "is writable by group"
    if case == "world-writable-file":
        library.chmod(0o757)
        return library, "the file is writable by others"
    if case == "foreign-owner":
        if os.geteuid() == 0:
            os.chown(library, 4242, -1)
            return library, "the file belongs to another user (uid 4242)"
        # not root: the file is ours, so the probe claims to be another user instead
        return library, f"the file belongs to another user (uid {os.geteuid()})"
    if case == "symlink":
        library.unlink()
        library.symlink_to(native.LIBRARY)
        return library, "the file cannot be opened"
    if case == "no-record":
        record.unlink()
        return library, "there is no build record"
    raise AssertionError(case)


HOSTILE = ["planted", "truncated", "without-symbols", "group-writable-folder", "world-writable-file", "foreign-owner",
           "symlink", "no-record"]
#: The variant a copy is loaded with: the best this CPU runs (forced, so that the AVX2 machines load it too).
_BEST = next((name for name in native.cpu_variants() if BUILT), None)
_NEEDS_COPY = pytest.mark.skipif(not BUILT or _BEST is None,
                                 reason=NOT_BUILT if not BUILT else f"this is an {CPU}: no variant to load")


@pytest.fixture(scope="module")
def fresh_processes(tmp_path_factory) -> dict[str, tuple[Path, str, dict]]:
    """Each case in its own fresh process, all started at once (a process is mostly torch's import): the forced
    variant read from the environment, the intact copy of the library and each spoilt one."""
    cases = {"environment": (native.LIBRARY, "", "", {native.ENV: _BEST})}
    for case in ["intact", *HOSTILE]:
        tmp_path = tmp_path_factory.mktemp(case)
        library, reason = _hostile_library(tmp_path, case)
        prelude = f"native._load_from({str(library)!r}, {_BEST!r})"
        if case == "foreign-owner" and os.geteuid() != 0:
            prelude = f"import os; os.geteuid = lambda: {os.geteuid() + 1}; " + prelude
        cases[case] = (library, reason, prelude, {})
    names, running, reports = list(cases), {}, {}
    for index, case in enumerate(names):  # three at a time
        for ahead in names[index:index + 3]:
            if ahead not in running:
                running[ahead] = _start(cases[ahead][2], cases[ahead][3])
        reports[case] = (*cases[case][:2], _report(running.pop(case)))
    return reports


@_NEEDS_COPY
def test_a_new_process_reads_the_variant_from_the_environment(fresh_processes) -> None:
    _, _, report = fresh_processes["environment"]
    assert report["status"] == f"{_BEST} variant (chosen by {native.ENV}={_BEST}) of {native.LIBRARY}", report
    assert not report["warnings"] and any(line.startswith("window attention") and ": native" in line
                                          for line in report["report"]), report


@_NEEDS_COPY
def test_a_copy_of_the_library_in_a_private_folder_loads(fresh_processes) -> None:
    """The control for the hostile cases: the same copy, unspoilt, passes every check and runs."""
    library, _, report = fresh_processes["intact"]
    assert report["status"] == f"{_BEST} variant (chosen by select({_BEST!r})) of {library}", report
    assert report["variant"] == _BEST and not report["warnings"], report


@_NEEDS_COPY
@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_library_is_refused_with_one_warning_and_torch_runs(fresh_processes, case) -> None:
    """Each spoilt copy, in a fresh process: refused before anything of it runs (a planted library's constructor
    never runs; a truncated file is not mapped), one RuntimeWarning naming the file and the reason, the status
    saying the same, and the forward pass on torch's operators."""
    library, reason, report = fresh_processes[case]
    assert report["variant"] is None, report
    assert report["status"].startswith(f"refused {library}: ") and reason in report["status"], report
    assert len(report["warnings"]) == 1, report
    assert str(library) in report["warnings"][0] and reason in report["warnings"][0]
    assert "image" not in report["warnings"][0] and "torch's operators run instead" in report["warnings"][0]
    assert not any(": native" in line for line in report["report"]), report
    if case == "planted":
        assert not (library.parent.parent / "constructor-ran").exists()


# --- the kernels, variant by variant, against float64 references ----------------------------------------------------

@pytest.fixture(params=list(native.VARIANTS))
def kernels(request):
    """Every kernel test runs on each variant this CPU runs (forced: the AVX2 variant is not used by default)."""
    name = request.param
    if not BUILT:
        pytest.skip(NOT_BUILT)
    if name not in native.cpu_variants():
        pytest.skip(f"the {name} variant needs a CPU that runs it (this is an {CPU})")
    assert native.select(name).startswith(f"{name} variant"), native.status()
    yield name
    native.select(None)


def reference(qkv: torch.Tensor, table: torch.Tensor, batch: int, height: int, width: int, heads: int, window: int):
    """softmax(q k^T / 4 + bias) v per window and head in float64, from the kernel's raster-order layout."""
    nh, nw, t, c = height // window, width // window, window * window, native.HEAD_DIM
    x = qkv.double().view(batch, nh, window, nw, window, 3, heads, c).permute(5, 0, 1, 3, 6, 2, 4, 7)
    q, k, v = x.reshape(3, batch, nh, nw, heads, t, c).unbind(0)
    bias = table.double().index_select(1, relative_position_index(window).reshape(-1)).view(heads, t, t)
    out = ((q @ k.transpose(-1, -2)) / math.sqrt(c) + bias).softmax(-1) @ v  # (b, nh, nw, heads, t, c)
    out = out.view(batch, nh, nw, heads, window, window, c).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(batch * height * width, heads * c)


def _close(out: torch.Tensor, expected: torch.Tensor, relative: float) -> bool:
    return (out.double() - expected).abs().max().item() <= relative * expected.abs().max().item()


GEOMETRIES = [(1, 64, 64, 4, 32), (2, 32, 48, 2, 16), (1, 48, 48, 3, 48), (3, 16, 16, 1, 16)]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[f"b{g[0]}-{g[1]}x{g[2]}-h{g[3]}-ws{g[4]}" for g in GEOMETRIES])
def test_window_attention_equals_float64_attention(kernels, geometry) -> None:
    batch, height, width, heads, window = geometry
    generator = torch.Generator().manual_seed(0)
    # scores spread over tens of units: the softmax is far from uniform, as in trained models
    qkv = torch.randn(batch * height * width, 3 * heads * 16, generator=generator) * 2.0
    table = torch.randn(heads, (2 * window - 1) ** 2, generator=generator) * 3.0
    out = native.window_attention(qkv, table, batch=batch, height=height, width=width, heads=heads, window=window)
    expected = reference(qkv, table, batch, height, width, heads, window)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert _close(out, expected, 2e-6)


def test_window_attention_refuses_what_it_does_not_take(kernels) -> None:
    qkv, table = torch.zeros(40 * 64, 3 * 64), torch.zeros(4, 63 * 63)
    with pytest.raises(ValueError, match="does not take a 40x64 map"):
        native.window_attention(qkv, table, batch=1, height=40, width=64, heads=4, window=32)
    with pytest.raises(ValueError, match="contiguous float32 rows"):
        native.window_attention(qkv.t(), table, batch=1, height=40, width=64, heads=4, window=32)


def test_only_float32_inference_outside_autograd_takes_the_kernels(kernels) -> None:
    x = torch.randn(1, 64, 32, 32)
    kernel = geometric_ensemble(torch.randn(16, 16, 13, 13))
    with torch.inference_mode():
        assert native.applies(x, head_dim=16, window=32) and native.takes("cpu", torch.float32, head_dim=16, window=32)
        assert not native.applies(x, head_dim=8, window=32)    # another head dimension
        assert not native.applies(x, head_dim=16, window=8)     # a window that is not a multiple of 16
        assert not native.applies(x.double(), head_dim=16, window=32)
        assert not native.applies(x.to(torch.bfloat16), head_dim=16, window=32)
        assert native.takes_ffn(x, channels=64, hidden=80, kernel_size=3)
        assert not native.takes_ffn(x[:, :40], channels=40, hidden=50, kernel_size=3)  # not whole vectors
        assert not native.takes_ffn(x, channels=64, hidden=80, kernel_size=5)
        assert isinstance(native.prepare_symmetric(kernel, x), native.SymmetricKernel)
        assert native.prepare_symmetric(kernel[:8], x) is None  # not square in channels
        assert native.prepare_symmetric(kernel.double(), x.double()) is None
    assert not native.applies(x, head_dim=16, window=32)        # autograd on: training runs torch's operators
    assert not native.takes_ffn(x, channels=64, hidden=80, kernel_size=3)
    assert native.prepare_symmetric(kernel, x) is None


def _ffn_layers(channels: int, hidden: int, seed: int = 5) -> tuple[torch.nn.Conv2d, torch.nn.Conv2d, torch.nn.Conv2d]:
    """ESC's ConvFFN as its three convolutions: expand 1x1, depthwise 3x3, project 1x1."""
    layers = (torch.nn.Conv2d(channels, hidden, 1), torch.nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
              torch.nn.Conv2d(hidden, channels, 1))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return layers


def _plain_ffn(layers, x: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
    """The FFN in float64 with torch's exact GELU: the reference."""
    expand, depthwise, project = ([p.double() for p in (layer.weight, layer.bias)] for layer in layers)
    h = F.gelu(F.conv2d(x.double(), *expand))
    h = F.gelu(F.conv2d(h, *depthwise, padding=1, groups=h.shape[1])) + h
    out = F.conv2d(h, *project)
    return out if add is None else out + add.double()


# (channels, hidden, batch, height, width): ESC's conv-stage FFN (80 hidden), its first FFN (128), the default
# model's (40 hidden: padded to 48), ESC-XL's (240), ESC-FP's (48 channels, 60 hidden), one-row and one-pixel maps
FFNS = [(64, 80, 1, 37, 45), (64, 128, 1, 16, 20), (32, 40, 2, 9, 70), (192, 240, 1, 6, 7), (48, 60, 1, 5, 9),
        (16, 32, 1, 1, 5), (32, 40, 3, 1, 1)]


@pytest.mark.parametrize("case", FFNS, ids=[f"c{c[0]}-h{c[1]}-b{c[2]}-{c[3]}x{c[4]}" for c in FFNS])
@pytest.mark.parametrize("with_add", [False, True], ids=["", "add"])
def test_fused_ffn_equals_the_float64_ffn(kernels, case, with_add) -> None:
    channels, hidden, batch, height, width = case
    layers = _ffn_layers(channels, hidden)
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(batch, channels, height, width, generator=generator)
    add = torch.randn(x.shape, generator=generator) if with_add else None
    with torch.inference_mode():
        out = native.conv_ffn(x, *layers, add)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert _close(out, _plain_ffn(layers, x, add), 2e-6)


def _norm(channels: int, generator: torch.Generator) -> LayerNorm2d:
    norm = LayerNorm2d(channels)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
        norm.bias.copy_(torch.randn(channels, generator=generator))
    return norm


def test_fused_ffn_applies_the_layer_norm_in_front(kernels) -> None:
    layers = _ffn_layers(64, 80)
    generator = torch.Generator().manual_seed(12)
    norm = _norm(64, generator)
    x = torch.randn(1, 64, 13, 22, generator=generator) * 2 + 1
    with torch.inference_mode():
        out = native.conv_ffn(x, *layers, norm=norm)
    normed = F.layer_norm(x.double().permute(0, 2, 3, 1), (64,), norm.weight.double(), norm.bias.double(), norm.eps)
    assert _close(out, _plain_ffn(layers, normed.permute(0, 3, 1, 2), None), 2e-6)


@pytest.mark.parametrize("with_norm", [False, True], ids=["", "norm"])
@pytest.mark.parametrize("with_add", [False, True], ids=["", "add"])
def test_native_projection_equals_layer_norm_then_linear(kernels, with_norm, with_add) -> None:
    """The attention's to_qkv with the block's LayerNorm fused in front, and to_out with the residual: rows of
    pixels (97 of them: not a whole number of the kernel's chunks)."""
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(97, 64, generator=generator) * 3 + 1
    weight, bias = torch.randn(192, 64, generator=generator) * 0.1, torch.randn(192, generator=generator)
    norm = _norm(64, generator)
    add = torch.randn(97, 192, generator=generator) if with_add else None
    with torch.inference_mode():
        out = native.linear_rows(x, weight, bias, norm=norm if with_norm else None, add=add)
    rows = F.layer_norm(x.double(), (64,), norm.weight.double(), norm.bias.double(), norm.eps) if with_norm else x.double()
    expected = rows @ weight.double().t() + bias.double() + (0 if add is None else add.double())
    assert _close(out, expected, 2e-6)


def _direct_correlation(x, kernel, dynamic):
    """The large-kernel correlation plus each sample's depthwise 3x3, in float64: the reference."""
    k = kernel.shape[-1]
    x, kernel, dynamic = x.double(), kernel.double(), dynamic.double()
    b, c = x.shape[:2]
    depthwise = F.conv2d(x.reshape(1, b * c, *x.shape[2:]), dynamic.reshape(b * c, 1, 3, 3), padding=1, groups=b * c)
    return F.conv2d(x, kernel, padding=k // 2) + depthwise.view(x.shape)


# (batch, channels, height, width, kernel): ESC's 16 channels, the default model's 8 (padded to 16), ESC-XL's 48, a
# batch with a dynamic kernel per sample, maps smaller than the kernel, another kernel size
CORRELATIONS = [(1, 16, 37, 45, 13), (1, 8, 20, 33, 13), (1, 48, 9, 14, 13), (2, 16, 15, 17, 13), (1, 16, 3, 5, 13),
                (1, 4, 12, 11, 7)]


@pytest.mark.parametrize("case", CORRELATIONS, ids=[f"b{c[0]}-c{c[1]}-{c[2]}x{c[3]}-k{c[4]}" for c in CORRELATIONS])
def test_symmetric_correlation_equals_the_direct_one(kernels, case) -> None:
    batch, channels, height, width, k = case
    generator = torch.Generator().manual_seed(7)
    kernel = geometric_ensemble(torch.randn(channels, channels, k, k, generator=generator) * 0.1)
    dynamic = torch.randn(batch, channels, 3, 3, generator=generator)
    # the first channels of a wider channels-last map, written into the first channels of another: as ESC runs it
    wide = torch.randn(batch, channels + 8, height, width, generator=generator).contiguous(memory_format=torch.channels_last)
    out = torch.zeros_like(wide)
    with torch.inference_mode():
        prepared = native.prepare_symmetric(kernel, wide)
        assert isinstance(prepared, native.SymmetricKernel)
        prepared.correlate(wide[:, :channels], dynamic, out=out[:, :channels])
    assert _close(out[:, :channels], _direct_correlation(wide[:, :channels], kernel, dynamic), 4e-6)
    assert not out[:, channels:].any()  # nothing written beyond its channels


def test_symmetric_correlation_reads_tiles_cut_from_a_map(kernels) -> None:
    generator = torch.Generator().manual_seed(8)
    kernel = geometric_ensemble(torch.randn(16, 16, 13, 13, generator=generator) * 0.1)
    dynamic = torch.randn(1, 16, 3, 3, generator=generator)
    whole = torch.randn(1, 64, 40, 50, generator=generator).contiguous(memory_format=torch.channels_last)
    tile = whole[:, :16, 5:30, 7:41]  # row stride of the whole map's width
    out = torch.empty(1, 16, 25, 34).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        native.SymmetricKernel(kernel).correlate(tile, dynamic, out=out)
    assert _close(out, _direct_correlation(tile, kernel, dynamic), 4e-6)


# (batch, channels of the kernel, channels of the map, height, width): ESC, the default model, ESC-XL; widths that are
# not multiples of the kernel's pixel blocks
PARTIAL = [(1, 16, 64, 37, 53), (2, 8, 32, 11, 19), (1, 48, 192, 5, 9)]


@pytest.mark.parametrize("case", PARTIAL, ids=[f"b{c[0]}-pdim{c[1]}-dim{c[2]}-{c[3]}x{c[4]}" for c in PARTIAL])
@pytest.mark.parametrize("with_add", [False, True], ids=["", "add"])
def test_fused_partial_convolution_equals_its_layers(kernels, case, with_add) -> None:
    """ESC's partial convolution and its 1x1 projection in one native pass, against the layers run one by one."""
    batch, pdim, dim, height, width = case
    generator = torch.Generator().manual_seed(9)
    kernel = geometric_ensemble(torch.randn(pdim, pdim, 13, 13, generator=generator) * 0.1)
    project = torch.nn.Conv2d(dim, dim, 1)
    dynamic = torch.randn(batch, pdim, 3, 3, generator=generator)
    x = torch.randn(batch, dim, height, width, generator=generator).contiguous(memory_format=torch.channels_last)
    add = torch.randn(x.shape, generator=generator) if with_add else None
    with torch.inference_mode():
        out = native.SymmetricKernel(kernel).partial_conv_attention(x, dynamic, project, add)
    mixed = torch.cat([_direct_correlation(x[:, :pdim], kernel, dynamic), x[:, pdim:].double()], 1)
    expected = F.conv2d(mixed, project.weight.double(), project.bias.double())
    expected = expected if add is None else expected + add.double()
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert _close(out, expected, 4e-6)


def test_a_prepared_model_on_the_kernels_equals_torch_operators(kernels) -> None:
    """Whole models through the runtime: every kernel in place against the same model without them. The default
    model (all three kinds of layer native: attention, FFN, partial convolution), a batch of two; ESC-FP, whose blocks
    have LayerNorms in front of every FFN (fused into the kernel)."""
    for preset, x in (("esc_tiny", torch.rand(2, 3, 29, 37)), ("esc_fp", torch.rand(1, 3, 21, 26))):
        model = esc_arch.PRESETS[preset](2)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(10)) * 0.02)
        model.eval()
        prepared = esc_runtime.prepare(model)
        assert [line for line in prepared.report() if line.startswith(("window attention", "ConvFFN"))] and all(
            ": native" in line for line in prepared.report() if line.startswith(("window attention", "ConvFFN"))), \
            prepared.report()
        with torch.inference_mode():
            out = prepared(x)
            reference = esc_runtime.prepare(model, disable=("native",))(x)
        assert (out - reference).abs().max().item() <= 2e-5, preset
