"""Build the Comfy Registry archive with comfy-cli and check that it works as a fresh install in a real ComfyUI.

    python scripts/comfy_pack_check.py [--comfy PATH_TO_comfy] [--keep DIR] [--commit REV]

1. ``comfy node validate`` and ``comfy node pack`` on a commit of this checkout (default HEAD, exported with
   ``git archive`` into a repository of its own, so work in progress is not packed; ``--commit worktree`` packs the
   checkout as it is). comfy-cli: ``pip install comfy-cli`` in any Python, no torch needed.
2. The archive must hold the pack (``__init__.py``, ``comfyui_nodes/``, ``esc_arch/`` with the embedded weights,
   ``esc_runtime/``, ``esc_sr/``, ``pyproject.toml``) and nothing ``.comfyignore`` keeps out (tests, benchmarks,
   training options, scripts, the BasicSR plugin).
3. It is unpacked on its own, linked into a fresh ``custom_nodes/`` (the only custom node), and the real ComfyUI
   0.3.75 of ``scripts/comfyui_env.py`` is started on it: the three ESC nodes must be there, and a workflow through
   each of them must run (the embedded model through Upscale Image (ESC), an ESC-LTE file through Upscale Image by
   Factor, an ESC file through the stock loader and upscaler).

Exit status 0 when every check passed. Needs no network once the ComfyUI environment is built.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))
sys.path.insert(0, str(REPO_ROOT))

REQUIRED = ("__init__.py", "pyproject.toml", "requirements.txt", "comfyui_nodes/__init__.py", "comfyui_nodes/nodes_v3.py",
            "esc_arch/weights/esc_default_x4.safetensors", "esc_arch/weights/esc_real_x4.safetensors",
            "esc_runtime/__init__.py", "esc_sr/__init__.py", "esc_sr/torchvision_shim.py")
EXCLUDED_PREFIXES = ("tests/", "benchmarks/", "options/", "scripts/", "basicsr_plugin/", "experiments/")


def _say(message: str) -> None:
    print(f"[comfy_pack_check] {message}", flush=True)


def export_commit(ref: str, dest: Path) -> Path:
    """The files of commit ``ref`` as a git repository of their own (one commit), so the archive holds exactly what
    that commit tracks, whatever is uncommitted in the working tree."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    git = ["git", "-C", str(dest), "-c", "user.name=pack-check", "-c", "user.email=pack-check@localhost"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", f"export of {ref}"], check=True)
    return dest


def build_archive(comfy: str, source: Path, out_dir: Path) -> Path:
    """Run comfy-cli's validate and pack in ``source``; return the archive, moved to ``out_dir``."""
    target = source / "node.zip"
    if target.exists():
        raise SystemExit(f"{target} exists already; move it away first")
    for command in (["node", "validate"], ["node", "pack"]):
        done = subprocess.run([comfy, "--skip-prompt", "--no-json", *command], cwd=source, capture_output=True,
                              text=True, timeout=600)
        _say(f"comfy {' '.join(command)}: exit {done.returncode}")
        for line in (done.stdout + done.stderr).strip().splitlines()[-8:]:
            print(f"    {line}")
        if done.returncode != 0:
            raise SystemExit(f"comfy {' '.join(command)} failed")
    archive = out_dir / "node.zip"
    shutil.move(str(target), archive)
    return archive


def check_contents(archive: Path) -> list[str]:
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
    missing = [name for name in REQUIRED if name not in names]
    leaked = [name for name in names if name.startswith(EXCLUDED_PREFIXES) or name in ("train.py", "test.py")]
    if missing:
        raise SystemExit(f"the archive lacks {', '.join(missing)}")
    if leaked:
        raise SystemExit(f"the archive holds what .comfyignore keeps out: {', '.join(leaked[:10])}")
    _say(f"archive: {len(names)} files, {archive.stat().st_size / 1e6:.2f} MB; "
         f"no {', '.join(p.rstrip('/') for p in EXCLUDED_PREFIXES)}")
    return names


def run_in_comfyui(pack_dir: Path, base: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image

    import esc_arch
    import esc_sr
    from comfyui_env import ensure_env
    from comfyui_server import ComfyServer

    server = ComfyServer(base, ensure_env(), pack_dir=pack_dir)
    server.prepare()
    torch.manual_seed(0)
    esc_sr.save_model(esc_arch.esc_tiny(scale=2), server.upscale_models_dir / "tiny_x2.safetensors")
    esc_sr.save_model(esc_arch.esc_lte(dim=16, pdim=8, n_blocks=1, conv_blocks=1, window_size=8, num_heads=2,
                                       hidden_dim=32, mlp_hidden=(32, 32)), server.upscale_models_dir / "lte.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(server.input_dir / "in.png")
    load = {"class_type": "LoadImage", "inputs": {"image": "in.png"}}
    save = lambda source, prefix: {"class_type": "SaveImage", "inputs": {"images": [source, 0], "filename_prefix": prefix}}  # noqa: E731
    workflows = {
        "Load ESC Model ([embedded] default) -> Upscale Image (ESC)": ({
            "1": load,
            "2": {"class_type": "ESCModelLoader", "inputs": {"model_name": "[embedded] default", "attention": "auto",
                                                            "precision": "auto"}},
            "3": {"class_type": "ESCUpscaleImage", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0],
                                                             "tile_size": 0, "overlap": 32, "precision": "auto",
                                                             "output_scale": 0.0, "alpha_upscale": "model"}},
            "4": save("3", "pack_esc")}, (96, 128)),
        "Load ESC Model (ESC-LTE file) -> Upscale Image by Factor (ESC arbitrary-scale) x2.5": ({
            "1": load,
            "2": {"class_type": "ESCModelLoader", "inputs": {"model_name": "lte.safetensors", "attention": "auto",
                                                            "precision": "fp32"}},
            "3": {"class_type": "ESCUpscaleImageByFactor", "inputs": {
                "upscale_model": ["2", 0], "image": ["1", 0], "factor": 2.5, "tile_size": 0, "overlap": 32,
                "precision": "auto", "alpha_upscale": "model"}},
            "4": save("3", "pack_lte")}, (60, 80)),
        "stock Load Upscale Model -> Upscale Image (using Model) on an ESC file": ({
            "1": load,
            "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "tiny_x2.safetensors"}},
            "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
            "4": save("3", "pack_stock")}, (48, 64)),
    }
    import io

    with server:
        _say(f"ComfyUI started on {server.url} with the unpacked archive as its only custom node")
        for node_id in ("ESCModelLoader", "ESCUpscaleImage", "ESCUpscaleImageByFactor"):
            info = server.get_json(f"/object_info/{node_id}")[node_id]
            _say(f"node {node_id} ({info['display_name']}) from {info['python_module']}")
        for title, (graph, shape) in workflows.items():
            entry = server.run_prompt(graph, timeout=300)
            status = entry["status"]["status_str"]
            if status != "success":
                raise SystemExit(f"{title}: {status}: {entry['status'].get('messages')}")
            image = Image.open(io.BytesIO(server.view(entry["outputs"]["4"]["images"][0])))
            if image.size[::-1] != shape:
                raise SystemExit(f"{title}: output {image.size[::-1]}, expected {shape}")
            _say(f"ok: {title}: {image.size[0]}x{image.size[1]}")
        server.check_log_for_import_failures()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfy", default=shutil.which("comfy") or "comfy", help="the comfy-cli executable")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it (default: a temporary one)")
    parser.add_argument("--commit", default="HEAD",
                        help="pack this commit (default HEAD); 'worktree' packs the checkout as it is, uncommitted "
                             "changes included, as `comfy node pack` run in it would")
    args = parser.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="esc-pack-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        source = REPO_ROOT if args.commit == "worktree" else export_commit(args.commit, work / "source")
        _say(f"packing {'the working tree' if args.commit == 'worktree' else args.commit} ({source})")
        archive = build_archive(args.comfy, source, work)
        check_contents(archive)
        pack_dir = work / "unpacked" / "esc-sr"
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(pack_dir)
        run_in_comfyui(pack_dir, work / "comfy_base")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    _say("all checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
