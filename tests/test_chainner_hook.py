"""The chaiNNer route (b): `esc-sr chainner install` puts this esc-sr and a lazy startup hook into a
Python, and chaiNNer's own loading sequence then loads ESC checkpoints.

Every test runs fresh interpreters of throw-away virtual environments, so that `site` really
processes the installed `.pth` file at start-up, as in chaiNNer's Python:

* the hook's own tests use small venvs (made with `venv`, no pip) that see this checkout and the
  test venv's packages through a plain path `.pth`;
* the one-command tests use one venv per session shaped like chaiNNer's Python: `python -m venv`
  (no system site-packages) with torch 2.13.0 (CPU, `-c constraints.txt`), spandrel 0.4.1 and
  spandrel_extra_arches 0.2.0 installed by pip, and no esc-sr until `esc-sr chainner install` puts it
  there, offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import time
import venv
import zipfile
from pathlib import Path

import pytest
import torch

from esc_sr import cli, distribution
from esc_sr.chainner_hook import HOOK_MODULE, HookError, install, install_hook, locate, uninstall, uninstall_hook

from golden import GOLDEN_DIR

REPO = Path(__file__).resolve().parents[1]
HERE_PACKAGES = sysconfig.get_paths()["purelib"]  # torch, spandrel, spandrel_extra_arches live here


def _make_python(root: Path, *, paths: list[str]) -> Path:
    """A fresh venv whose site-packages also lists ``paths`` (via a plain path .pth)."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    python = root / "bin" / "python"
    site_packages = locate(python).site_packages
    (site_packages / "deps.pth").write_text("".join(f"{p}\n" for p in paths))
    return python


def _run(python: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    # cwd: not the checkout, which `python -c` would otherwise put on sys.path.
    return subprocess.run(
        [str(python), "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=300, cwd=python.parents[2],
    )


@pytest.fixture()
def full_python(tmp_path: Path) -> Path:
    """A Python that has torch, spandrel, spandrel_extra_arches and esc-sr, like a prepared chaiNNer."""
    return _make_python(tmp_path / "py", paths=[HERE_PACKAGES, str(REPO)])


# chaiNNer's sequence (backend/src/packages/chaiNNer_pytorch/pytorch/io/load_model.py): add the extra
# architectures without ignore_duplicates at import time, load with ModelLoader(device), freeze,
# eval, then .half() only where the descriptor says it supports fp16.
CHAINNER_SEQUENCE = """
    import json, sys
    state_at_start = {name: name in sys.modules for name in ("esc_sr_chainner_hook", "torch", "esc_arch", "spandrel")}

    import torch
    from spandrel import MAIN_REGISTRY, ModelLoader
    from spandrel_extra_arches import EXTRA_REGISTRY

    MAIN_REGISTRY.add(*EXTRA_REGISTRY)

    results = []
    for path in sys.argv[1:]:
        model = ModelLoader(torch.device("cpu")).load_from_file(path)
        for parameter in model.model.parameters():
            parameter.requires_grad = False
        model.eval()
        model = model.half() if model.supports_half else model.float()
        image = torch.rand(1, 3, 19, 23).to(model.dtype)
        out = model(image)
        results.append({
            "arch": model.architecture.id, "scale": model.scale, "dtype": str(out.dtype),
            "shape": list(out.shape), "finite": bool(torch.isfinite(out).all()),
            "in_range": bool(out.min() >= 0 and out.max() <= 1),
            "card": getattr(getattr(model, "esc_model_card", None), "name", None),
        })
    print(json.dumps({"start": state_at_start, "results": results}))
"""


def test_chainner_loading_sequence_loads_esc_pth_and_safetensors(full_python: Path, tmp_path: Path) -> None:
    import esc_arch
    import esc_sr

    tiny = esc_arch.esc_tiny(2, n_blocks=1, conv_blocks=2)
    ours = esc_sr.save_model(tiny, tmp_path / "2x_esc_tiny.safetensors")
    files = [
        str(GOLDEN_DIR / "escrealm_pixelshuffle_x4.ckpt.pth"),          # official BasicSR .pth
        str(GOLDEN_DIR / "trainner_escrealm_x2.ckpt.safetensors"),      # traiNNer-redux safetensors
        str(GOLDEN_DIR / "lte_esc.ckpt.pth"),                           # supports_half False -> .float()
        str(ours),                                                      # written by esc_sr.save_model
        str(esc_arch.EMBEDDED_MODELS["real"]),                          # shipped: its descriptor has its card
    ]
    install_hook(full_python)

    done = _run(full_python, CHAINNER_SEQUENCE, *files)

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # The hook ran at start-up but imported nothing heavy: torch/esc_arch came only with spandrel.
    assert report["start"] == {"esc_sr_chainner_hook": True, "torch": False, "esc_arch": False, "spandrel": False}
    assert [(r["arch"], r["scale"], r["dtype"]) for r in report["results"]] == [
        ("ESCRealM", 4, "torch.float16"),
        ("ESCRealM", 2, "torch.float16"),
        ("ESCLTE", 4, "torch.float32"),
        ("ESC", 2, "torch.float16"),
        ("ESCRealM", 4, "torch.float16"),
    ]
    assert [r["card"] for r in report["results"]] == [None, None, None, None, "real"]
    for result in report["results"]:
        assert result["shape"] == [1, 3, 19 * result["scale"], 23 * result["scale"]]
        assert result["finite"] and result["in_range"]
    assert "esc-sr chainner hook" not in done.stderr  # no warnings


def test_without_the_hook_chainner_cannot_load_esc(full_python: Path) -> None:
    # This test venv's torchvision needs the shim to import next to CPU torch (the hook applies it;
    # chaiNNer's matching torchvision does not need it).
    shim = "from esc_sr.torchvision_shim import ensure_torchvision_importable; ensure_torchvision_importable()\n"
    done = _run(full_python, shim + textwrap.dedent(CHAINNER_SEQUENCE), str(GOLDEN_DIR / "escrealm_pixelshuffle_x4.ckpt.pth"))

    assert done.returncode != 0
    assert "UnsupportedModelError" in done.stderr


def test_hook_is_harmless_without_torch_spandrel_or_esc_arch(tmp_path: Path) -> None:
    bare = _make_python(tmp_path / "bare", paths=[])
    install_hook(bare, require_esc_arch=False)

    # Started, and cheap: nothing beyond the standard library's start-up modules was imported.
    started = _run(bare, "import sys; print('esc_sr_chainner_hook' in sys.modules, any(m in sys.modules for m in ('torch', 'typing', 'importlib.abc')))")
    missing = _run(bare, "import spandrel")

    assert started.returncode == 0 and started.stdout.split() == ["True", "False"]
    assert started.stderr == ""
    assert list((locate(bare).site_packages / "__pycache__").glob(f"{HOOK_MODULE}.*.pyc"))  # compiled once
    assert missing.returncode == 1
    assert "No module named 'spandrel'" in missing.stderr
    assert "esc-sr chainner hook" not in missing.stderr


def test_hook_reports_in_one_line_when_esc_sr_is_missing_but_spandrel_loads(tmp_path: Path) -> None:
    no_esc = _make_python(tmp_path / "no_esc", paths=[HERE_PACKAGES])
    install_hook(no_esc, require_esc_arch=False)

    # The shim, loaded from its file (esc_arch itself must stay unimportable here), lets this
    # venv's torchvision import next to CPU torch.
    shim = REPO / "esc_sr" / "torchvision_shim.py"
    done = _run(no_esc, f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("torchvision_shim", {str(shim)!r})
        shim = importlib.util.module_from_spec(spec); spec.loader.exec_module(shim)
        shim.ensure_torchvision_importable()
        import spandrel
        print(len(spandrel.MAIN_REGISTRY) > 0, "ESC" in spandrel.MAIN_REGISTRY)
    """)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]
    warnings = [line for line in done.stderr.splitlines() if "esc-sr chainner hook" in line]
    assert len(warnings) == 1 and "esc_arch is not importable" in warnings[0]


def test_install_hook_alone_refuses_a_python_without_esc_sr_and_names_the_fix(tmp_path: Path) -> None:
    bare = _make_python(tmp_path / "bare", paths=[])

    with pytest.raises(HookError, match=r"esc-sr is not installed in .*`esc-sr chainner install --python .*` installs it"):
        install_hook(bare)
    assert not (locate(bare).site_packages / f"{HOOK_MODULE}.pth").exists()


def test_install_needs_pip_in_the_target_and_says_so(tmp_path: Path) -> None:
    bare = _make_python(tmp_path / "bare", paths=[])  # venv without pip

    with pytest.raises(HookError, match=r"has no pip \(`.* -m ensurepip` adds it\)"):
        install(bare)
    assert not (locate(bare).site_packages / f"{HOOK_MODULE}.pth").exists()


def test_cli_hook_only_install_is_idempotent_and_uninstall_leaves_a_foreign_esc_sr(full_python: Path, capsys) -> None:
    site_packages = locate(full_python).site_packages

    assert cli.main(["chainner", "install", "--hook-only", "--python", str(full_python)]) == 0
    assert cli.main(["chainner", "install", "--hook-only", "--python", str(full_python)]) == 0
    assert (site_packages / f"{HOOK_MODULE}.pth").read_text().strip().endswith(f"import {HOOK_MODULE}")
    assert (site_packages / f"{HOOK_MODULE}.py").exists()
    assert json.loads((site_packages / f"{HOOK_MODULE}.json").read_text())["installed_esc_sr"] is False
    assert "installed esc-sr" not in capsys.readouterr().out  # --hook-only: no package step

    assert cli.main(["chainner", "uninstall", "--python", str(full_python)]) == 0
    out = capsys.readouterr().out
    # esc-sr reaches this Python through a path .pth (not put there by install): it stays.
    assert "was not installed by `esc-sr chainner install`; left in place" in out
    assert not any(site_packages.glob(f"{HOOK_MODULE}.*"))
    assert cli.main(["chainner", "uninstall", "--python", str(full_python)]) == 0
    assert "nothing to remove" in capsys.readouterr().out
    after = _run(full_python, "import sys; print('esc_sr_chainner_hook' in sys.modules)")
    assert after.stdout.strip() == "False"


def test_uninstall_leaves_foreign_files_alone(full_python: Path) -> None:
    foreign = locate(full_python).site_packages / f"{HOOK_MODULE}.pth"
    foreign.write_text("import something_else\n")

    with pytest.raises(HookError, match="not written by esc-sr"):
        uninstall_hook(full_python)
    with pytest.raises(HookError, match="not written by esc-sr"):
        install_hook(full_python)
    assert foreign.read_text() == "import something_else\n"


def test_cli_reports_a_missing_python_in_one_line(capsys) -> None:
    assert cli.main(["chainner", "install", "--python", "/nonexistent/python3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["esc-sr chainner: error: /nonexistent/python3: no such Python executable"]


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_python_that_floods_its_output_is_stopped_within_the_bound(tmp_path: Path, capsys, stream: str) -> None:
    """Issue 26: a "python" that writes without end took esc-sr to 2.6 GB in 7 s, then "internal error: MemoryError".
    What is read of the target interpreter is bounded (1 MiB a stream): the program is stopped and refused in one
    line, at once, the memory of this process not growing beyond the bound."""
    import resource

    from esc_sr import chainner_hook

    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec yes 'not a python answer' {'>&2' if stream == 'stderr' else ''}\n")
    fake.chmod(0o755)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    assert cli.main(["chainner", "install", "--python", str(fake)]) == 1
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"esc-sr chainner: error: {fake}: wrote more than 1 MiB of output"), err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 64 * 1024  # KiB: under 64 MB of growth
    assert chainner_hook.OUTPUT_LIMIT == 1 << 20


# -- one command: esc-sr itself and the hook, into a fresh Python shaped like chaiNNer's -------------------


@pytest.fixture(scope="session")
def chainner_python(tmp_path_factory) -> Path:
    """A venv like chaiNNer's integrated Python: its own pip-installed torch and spandrel, no esc-sr.

    Built once per session (about a minute: the torch wheel is local, see constraints.txt)."""
    root = tmp_path_factory.mktemp("chainner") / "python"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=600, cwd=root.parent)
    python = root / "bin" / "python"
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(REPO / "constraints.txt"),
         "torch==2.13.0", "spandrel==0.4.1", "spandrel_extra_arches==0.2.0"],
        capture_output=True, text=True, timeout=1200, cwd=root.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    where = locate(python)
    assert not where.esc_arch_importable and where.esc_sr_version is None and where.has_pip
    return python


def _offline(monkeypatch, tmp_path: Path) -> None:
    """Any index or network access the installation tried would fail (it must need none)."""
    empty = tmp_path / "no-wheels"
    empty.mkdir(exist_ok=True)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.delenv("PYTHONPATH", raising=False)


def _torch_fingerprint(python: Path) -> tuple[str, float, str]:
    done = _run(python, """
        import importlib.metadata as md, importlib.util, os
        spec = importlib.util.find_spec("torch")
        print(md.version("torch"), os.stat(spec.origin).st_mtime_ns, spec.origin)
    """)
    assert done.returncode == 0, done.stderr
    version, mtime, origin = done.stdout.split()
    return version, float(mtime), origin


# chaiNNer's sequence again (as above), once with its fp16 setting off and once on, writing every output for
# comparison: out of the box, the first call in the process is the import of spandrel.
REPLAY = """
    import json, sys
    state_at_start = {name: name in sys.modules for name in ("esc_sr_chainner_hook", "torch", "esc_arch", "spandrel")}

    import torch
    from spandrel import MAIN_REGISTRY, ModelLoader
    from spandrel_extra_arches import EXTRA_REGISTRY

    MAIN_REGISTRY.add(*EXTRA_REGISTRY)

    def load_model_node(path, fp16):
        model = ModelLoader(torch.device("cpu")).load_from_file(path)
        for parameter in model.model.parameters():
            parameter.requires_grad = False
        model.eval()
        return model.half() if fp16 and model.supports_half else model.float()

    results = []
    for path, settings in zip(sys.argv[1::2], sys.argv[2::2]):  # settings: "fp32" or "fp32,fp16"
        image = torch.load(path + ".input.pt")
        for fp16 in [setting == "fp16" for setting in settings.split(",")]:
            model = load_model_node(path, fp16)
            out = model(image.to(model.dtype))
            torch.save(out.float(), f"{path}.{'fp16' if fp16 else 'fp32'}.out.pt")
            results.append({"arch": model.architecture.id, "scale": model.scale, "dtype": str(out.dtype)})
    print(json.dumps({"start": state_at_start, "results": results}))
"""


def test_one_command_installs_esc_sr_and_the_hook_offline_and_chainner_loads_official_checkpoints(
    chainner_python: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import esc_arch

    _offline(monkeypatch, tmp_path)
    torch_before = _torch_fingerprint(chainner_python)
    site_packages = locate(chainner_python).site_packages

    started = time.perf_counter()
    assert cli.main(["chainner", "install", "--python", str(chainner_python)]) == 0
    install_s = time.perf_counter() - started
    out = capsys.readouterr().out
    assert f"installed esc-sr {distribution.origin().version} from " in out
    assert f"into {chainner_python} (pip --no-deps --no-index; its torch 2.13.0+cpu untouched)" in out
    assert cli.main(["chainner", "install", "--python", str(chainner_python)]) == 0  # idempotent: refreshed
    capsys.readouterr()

    where = locate(chainner_python)
    assert where.esc_arch_importable and where.esc_sr_version == distribution.origin().version
    assert _torch_fingerprint(chainner_python) == torch_before  # the same torch files, untouched
    assert install_s < 120

    # Official checkpoints (dslisleedh/ESC BasicSR files): ESC x4 and ESCRealM with the DySample head, the
    # latter also with chaiNNer's fp16 setting on (fp16 convolutions are slow on CPU; DySample is the head
    # with fp32 islands). Sizes are multiples of the window: spandrel adds no padding, esc_arch runs the same pixels.
    cases = {"esc_x4.ckpt.pth": ((32, 32), "fp32"), "escrealm_dysample_x4.ckpt.pth": ((48, 32), "fp32,fp16")}
    files, arguments = [], []
    for name, ((h, w), settings) in cases.items():
        path = tmp_path / name
        path.write_bytes((GOLDEN_DIR / name).read_bytes())
        torch.save(torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(len(files))), f"{path}.input.pt")
        files.append(str(path))
        arguments += [str(path), settings]

    done = _run(chainner_python, REPLAY, *arguments)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "esc-sr chainner hook" not in done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["start"] == {"esc_sr_chainner_hook": True, "torch": False, "esc_arch": False, "spandrel": False}
    assert [(r["arch"], r["scale"], r["dtype"]) for r in report["results"]] == [
        ("ESC", 4, "torch.float32"), ("ESCRealM", 4, "torch.float32"), ("ESCRealM", 4, "torch.float16"),
    ]
    for file in files:
        model = esc_arch.load_model(file)
        x = torch.load(f"{file}.input.pt")
        with torch.no_grad():
            expected = model(x).clamp(0, 1)
        fp32 = torch.load(f"{file}.fp32.out.pt")
        assert fp32.shape == expected.shape == (1, 3, 4 * x.shape[-2], 4 * x.shape[-1])
        assert (fp32 - expected).abs().max() <= 1e-4, file
    fp16 = torch.load(f"{files[1]}.fp16.out.pt")
    assert (fp16 - expected).abs().max() <= 0.02  # the last expected: ESCRealM's

    assert cli.main(["chainner", "uninstall", "--python", str(chainner_python)]) == 0
    out = capsys.readouterr().out
    assert f"uninstalled esc-sr {distribution.origin().version} from {chainner_python}" in out
    where = locate(chainner_python)
    assert not where.esc_arch_importable and where.esc_sr_version is None
    assert not any(site_packages.glob(f"{HOOK_MODULE}*")) and not any(site_packages.glob("esc_sr*"))
    assert not (chainner_python.parent / "esc-sr").exists()  # its console script went with it
    assert _torch_fingerprint(chainner_python) == torch_before
    # Back to chaiNNer's own state: ESC is unsupported again. (The shim, loaded from its file, lets this venv's
    # CUDA-built torchvision import next to CPU torch; the hook did that before; chaiNNer's torchvision needs none.)
    shim = REPO / "esc_sr" / "torchvision_shim.py"
    without = _run(chainner_python, textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("torchvision_shim", {str(shim)!r})
        shim = importlib.util.module_from_spec(spec); spec.loader.exec_module(shim)
        shim.ensure_torchvision_importable()
    """) + textwrap.dedent(REPLAY), files[0], "fp32")
    assert without.returncode != 0 and "UnsupportedModelError" in without.stderr, without.stderr[-2000:]


def test_an_installed_esc_sr_rebuilds_the_same_wheel_and_uninstall_says_what_it_replaced(
    chainner_python: Path, tmp_path: Path, monkeypatch
) -> None:
    _offline(monkeypatch, tmp_path)
    ours = distribution.wheel_of_this(tmp_path / "ours")  # this checkout: an editable install, built from source
    assert ours.origin.kind == "editable" and ours.origin.source == REPO
    # Installed by hand first (as the old instructions said): install replaces it and remembers that.
    by_hand = subprocess.run(
        [str(chainner_python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(ours.path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert by_hand.returncode == 0, by_hand.stderr
    try:
        report = install(chainner_python)
        assert report.package.startswith(f"esc-sr {ours.origin.version} from its source folder {REPO}")
        state = json.loads(report.where.state_file.read_text())
        assert state["installed_esc_sr"] is True and state["replaced"] == ours.origin.version

        # In that Python esc-sr is a regular installation now, from a wheel file that no longer exists:
        # a wheel is assembled from its installed files, with the same contents.
        done = _run(chainner_python, """
            import sys
            from esc_sr import distribution
            wheel = distribution.wheel_of_this(sys.argv[1])
            print(wheel.origin.kind, wheel.path)
        """, str(tmp_path / "theirs"))
        assert done.returncode == 0, done.stderr[-2000:]
        kind, path = done.stdout.split()
        assert kind == "installed"

        def contents(wheel: Path) -> dict[str, bytes]:
            with zipfile.ZipFile(wheel) as archive:
                return {n: archive.read(n) for n in archive.namelist() if not n.endswith(".dist-info/RECORD")}

        assert Path(path).name == ours.path.name
        assert contents(Path(path)) == contents(ours.path)
        with zipfile.ZipFile(path) as archive:
            record = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))).decode()
        assert len(record.splitlines()) == len(archive.namelist())
    finally:
        removed = uninstall(chainner_python)
    assert removed.package == f"esc-sr {ours.origin.version}"
    assert removed.notes == [f"esc-sr {ours.origin.version}, which install replaced, is not restored"]
    assert locate(chainner_python).esc_sr_version is None
