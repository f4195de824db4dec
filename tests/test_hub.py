"""The official-weights registry and download cache (esc_sr.hub), against a real local HTTP server.

A small ``http.server`` on 127.0.0.1 plays the GitHub release: it serves a real checkpoint file
(a golden BasicSR checkpoint written by the official code) under ``/<NAME>.pth`` and records every
request so tests can tell whether the network was used. It can also misbehave: drop the connection
early, stall, send something that is not a checkpoint, or send slowly (to overlap two downloads).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from esc_sr import hub
from golden import GOLDEN_DIR  # noqa: E402

GOLDEN = GOLDEN_DIR
FIXTURE_CHECKPOINT = GOLDEN / "esc_light_x2.ckpt.pth"  # BasicSR format, like the release assets


@dataclass
class ServedFile:
    """What the fake release serves, and what it has seen."""

    payload: bytes
    requests: list[dict] = field(default_factory=list)
    cut_after: int | None = None  # send at most this many body bytes, then drop the connection
    stall_after: int | None = None  # send this many body bytes, then go silent for `stall_s`
    stall_s: float = 3.0
    slow_chunks: int | None = None  # send the body in this many pieces, 0.25 s apart
    error_status: int | None = None  # answer every request with this HTTP error


def _make_handler(served: ServedFile) -> type[http.server.BaseHTTPRequestHandler]:
    class ReleaseHandler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            range_header = self.headers.get("Range")
            served.requests.append({"path": self.path, "range": range_header})
            if served.error_status is not None:
                self.send_error(served.error_status)
                return
            body = served.payload
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if served.cut_after is not None:
                self.wfile.write(body[: served.cut_after])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if served.stall_after is not None:
                self.wfile.write(body[: served.stall_after])
                self.wfile.flush()
                time.sleep(served.stall_s)
                self.close_connection = True
                return
            pieces = served.slow_chunks or 1
            step = -(-len(body) // pieces)
            for start in range(0, len(body), step):
                self.wfile.write(body[start : start + step])
                self.wfile.flush()
                if served.slow_chunks:
                    time.sleep(0.25)

    return ReleaseHandler


@pytest.fixture
def fixture_bytes() -> bytes:
    if not FIXTURE_CHECKPOINT.is_file():
        pytest.fail(f"golden fixture missing: {FIXTURE_CHECKPOINT} (tests read ../shared beside the repo)")
    return FIXTURE_CHECKPOINT.read_bytes()


@pytest.fixture
def release(fixture_bytes, monkeypatch, tmp_path):
    """A running fake release server; ESC_SR_WEIGHTS_BASE_URL and ESC_SR_CACHE point at it and a temp cache."""
    served = ServedFile(payload=fixture_bytes)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(served))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/releases/download/1.0.0"
    monkeypatch.setenv(hub.BASE_URL_ENV, base)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    served.base_url = base  # type: ignore[attr-defined]
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cache_files(tmp_path: Path) -> list[str]:
    cache = tmp_path / "cache"
    return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


def test_registry_lists_every_official_release_asset():
    names = set(hub.REGISTRY)
    for family in ("ESC_DIV2K", "ESC_light", "ESC_FP", "ESC_DFLIP"):
        assert {f"{family}_X{s}" for s in (2, 3, 4)} <= names
    assert {f"ESC_XL_DF2K_X{s}_FT" for s in (2, 3, 4)} <= names
    assert {"ESC_Real_X4_MSE", "ESC_Real_X4_GAN"} <= names
    assert len(names) == 17
    assert hub.REGISTRY["ESC_DIV2K_X4"].url(hub.RELEASE_BASE_URL) == (
        "https://github.com/dslisleedh/ESC/releases/download/1.0.0/ESC_DIV2K_X4.pth"
    )
    # Only the two published checksums are known; nothing is invented for the others.
    known = {name: asset.sha256 for name, asset in hub.REGISTRY.items() if asset.sha256}
    assert known == {
        "ESC_Real_X4_GAN": "d6932bd01e29c9335f5f678b0e9b31ede906a42244887ab8888b1d39a8667f2d",
        "ESC_Real_X4_MSE": "ba22ae75b5f77382b1046e68634f58a53fc7ff5ffa46714133bfba30811ad943",
    }


def test_cache_dir_follows_env_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "mine"))
    assert hub.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(hub.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "esc-sr" / "weights"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hub.cache_dir() == Path.home() / ".cache" / "esc-sr" / "weights"


def test_existing_path_is_returned_unchanged_without_network(release, tmp_path):
    local = tmp_path / "ESC_DIV2K_X4.pth"  # even a file named like a registry entry
    local.write_bytes(b"x")
    assert hub.resolve_model(local) == local
    assert hub.resolve_model(str(local)) == Path(str(local))
    assert release.requests == []


def test_first_download_writes_the_file_into_the_cache(release, fixture_bytes, tmp_path):
    path = hub.resolve_model("ESC_DIV2K_X4")

    assert path == tmp_path / "cache" / "ESC_DIV2K_X4.pth"
    assert path.read_bytes() == fixture_bytes
    assert [r["path"] for r in release.requests] == ["/releases/download/1.0.0/ESC_DIV2K_X4.pth"]
    assert release.requests[0]["range"] is None
    assert _cache_files(tmp_path) == ["ESC_DIV2K_X4.pth"]  # no temporary or lock file left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600


def test_downloaded_checkpoint_loads_as_a_model(release):
    import torch
    from esc_arch import load_model

    model = load_model(hub.resolve_model("ESC_light_X2"))
    assert model.scale == 2
    with torch.no_grad():
        assert model(torch.rand(1, 3, 8, 8)).shape == (1, 3, 16, 16)


def test_second_call_uses_the_cache_and_makes_no_request(release):
    first = hub.resolve_model("ESC_DIV2K_X4")
    n_requests = len(release.requests)
    second = hub.resolve_model("esc_div2k_x4")  # names are case-insensitive
    third = hub.resolve_model("ESC_DIV2K_X4.pth")
    assert first == second == third
    assert len(release.requests) == n_requests == 1


def test_interrupted_download_fails_clearly_and_leaves_nothing_then_starts_over(release, fixture_bytes, tmp_path):
    release.cut_after = 100_000
    with pytest.raises(hub.DownloadError) as failure:
        hub.resolve_model("ESC_light_X4")
    message = str(failure.value)
    assert "connection closed early" in message and "100000 bytes" in message
    assert f"{release.base_url}/ESC_light_X4.pth" in message and "\n" not in message
    assert _cache_files(tmp_path) == []  # never a truncated file under the final name, no partial file either

    release.cut_after = None
    path = hub.resolve_model("ESC_light_X4")
    assert release.requests[-1]["range"] is None  # a fresh download of the whole file
    assert path.read_bytes() == fixture_bytes
    assert _cache_files(tmp_path) == ["ESC_light_X4.pth"]


def test_something_that_is_not_a_checkpoint_is_not_cached(release, tmp_path):
    release.payload = b"<html><body>Sign in to continue</body></html>\n"  # a mirror's login page, status 200
    with pytest.raises(hub.DownloadError, match="not a complete PyTorch checkpoint"):
        hub.resolve_model("ESC_FP_X2")
    assert _cache_files(tmp_path) == []


def test_stalled_server_times_out_and_leaves_nothing(release, tmp_path):
    release.stall_after = 1000
    started = time.monotonic()
    with pytest.raises(hub.DownloadError, match="timed out"):
        hub.resolve_model("ESC_FP_X3", timeout=0.5)
    assert time.monotonic() - started < release.stall_s
    assert _cache_files(tmp_path) == []
    assert socket.getdefaulttimeout() is None  # the process-wide default is restored


def test_two_concurrent_downloads_of_one_file_both_end_with_the_complete_file(release, fixture_bytes, tmp_path):
    """Another process and this one download the same file at the same time (no lock between processes)."""
    release.slow_chunks = 8  # about 2 s per download, so the two overlap
    script = "from esc_sr import hub; print(hub.resolve_model('ESC_DIV2K_X3', progress=False))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    other = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not release.requests:  # wait until the other process is downloading
            assert other.poll() is None, "the other process exited before downloading"
            assert time.monotonic() < deadline, "the other process never started its download"
            time.sleep(0.05)
        here = hub.resolve_model("ESC_DIV2K_X3")
        out, _ = other.communicate(timeout=120)
    finally:
        if other.poll() is None:
            other.kill()
    assert other.returncode == 0
    assert Path(out.strip()) == here
    assert len(release.requests) == 2  # both really downloaded
    assert here.read_bytes() == fixture_bytes
    assert _cache_files(tmp_path) == ["ESC_DIV2K_X3.pth"]


def test_concurrent_calls_in_one_process_download_once(release, fixture_bytes, tmp_path):
    release.slow_chunks = 4
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(hub.resolve_model("ESC_FP_X4"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 3 and len(set(results)) == 1
    assert len(release.requests) == 1
    assert results[0].read_bytes() == fixture_bytes
    assert _cache_files(tmp_path) == ["ESC_FP_X4.pth"]


def test_known_checksum_is_verified_on_success(release, fixture_bytes, monkeypatch):
    asset = hub.ReleaseAsset("ESC_Real_X4_MSE", 4, "test double with the fixture's checksum", _sha256(fixture_bytes))
    monkeypatch.setitem(hub._BY_LOWER_NAME, "esc_real_x4_mse", asset)
    assert hub.resolve_model("ESC_Real_X4_MSE").read_bytes() == fixture_bytes


def test_checksum_mismatch_is_rejected_and_nothing_is_cached(release, fixture_bytes, tmp_path):
    # The fake release serves our fixture, not the real GAN weights, so the known sha256 cannot match.
    with pytest.raises(hub.ChecksumError) as failure:
        hub.resolve_model("ESC_Real_X4_GAN")
    message = str(failure.value)
    assert hub.REGISTRY["ESC_Real_X4_GAN"].sha256 in message
    assert _sha256(fixture_bytes) in message
    assert "\n" not in message
    assert _cache_files(tmp_path) == []  # neither the file nor a temporary one


def test_offline_error_names_the_url_and_the_cache_path(monkeypatch, tmp_path):
    # A port nothing listens on: connection refused, as when offline.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}/dl"
    monkeypatch.setenv(hub.BASE_URL_ENV, base)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))

    with pytest.raises(hub.DownloadError) as failure:
        hub.resolve_model("ESC_DIV2K_X4", timeout=5)

    message = str(failure.value)
    assert f"{base}/ESC_DIV2K_X4.pth" in message
    assert str(tmp_path / "cache" / "ESC_DIV2K_X4.pth") in message
    assert "\n" not in message


def test_http_error_is_reported_with_its_status(release, tmp_path):
    release.error_status = 404
    with pytest.raises(hub.DownloadError, match=r"HTTP 404") as failure:
        hub.resolve_model("ESC_DIV2K_X4")
    assert f"{release.base_url}/ESC_DIV2K_X4.pth" in str(failure.value)
    assert _cache_files(tmp_path) == []


def test_manually_placed_file_is_used_offline(monkeypatch, tmp_path, fixture_bytes):
    monkeypatch.setenv(hub.BASE_URL_ENV, "http://127.0.0.1:9/unreachable")
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    placed = tmp_path / "cache" / "ESC_DFLIP_X4.pth"
    shutil.copyfile(FIXTURE_CHECKPOINT, placed)
    assert hub.resolve_model("ESC_DFLIP_X4") == placed


def test_unknown_name_suggests_close_matches():
    with pytest.raises(hub.UnknownModelError) as failure:
        hub.resolve_model("ESC_DIV2K_X5")
    message = str(failure.value)
    assert message.startswith("unknown model name: ESC_DIV2K_X5")
    assert "ESC_DIV2K_X4" in message
    assert "esc-sr models" in message


def test_missing_file_path_is_reported_as_a_missing_file(tmp_path):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(hub.UnknownModelError, match=r"^model file not found: .*model\.safetensors$"):
        hub.resolve_model(missing)


def test_list_models_reports_cache_state(release, fixture_bytes, tmp_path):
    hub.resolve_model("ESC_light_X3")

    statuses = {status.asset.name: status for status in hub.list_models()}

    assert len(statuses) == 17
    assert statuses["ESC_light_X3"].cached
    assert statuses["ESC_light_X3"].path == tmp_path / "cache" / "ESC_light_X3.pth"
    assert not statuses["ESC_DIV2K_X4"].cached
    assert statuses["ESC_DIV2K_X4"].url == f"{release.base_url}/ESC_DIV2K_X4.pth"


def _run_models_cli(argv: list[str]) -> int:
    from esc_sr import cli

    args = cli.build_parser().parse_args(argv)
    return args.func(args)


def test_models_command_lists_names_and_cache_state(release, tmp_path, capsys):
    hub.resolve_model("ESC_FP_X2")
    assert _run_models_cli(["models"]) == 0
    printed = capsys.readouterr().out
    assert f"Cache folder: {tmp_path / 'cache'}" in printed
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.startswith("ESC_")}
    assert set(rows) == set(hub.REGISTRY)
    assert rows["ESC_FP_X2"][1:3] == ["x2", "yes"]
    assert rows["ESC_DIV2K_X4"][1:4] == ["x4", "no", "-"]
    assert rows["ESC_Real_X4_GAN"][1:4] == ["x4", "no", "known"]


def test_models_download_prefetches_into_the_cache(release, fixture_bytes, tmp_path, capsys):
    assert _run_models_cli(["models", "--download", "esc_dflip_x3"]) == 0
    cached = tmp_path / "cache" / "ESC_DFLIP_X3.pth"
    assert f"ESC_DFLIP_X3: {cached}" in capsys.readouterr().out
    assert cached.read_bytes() == fixture_bytes

    with pytest.raises(hub.UnknownModelError, match="ESC_DFLIP_X3"):
        _run_models_cli(["models", "--download", "ESC_DFLIP_X33"])


def test_download_model_takes_registry_names_only(release, fixture_bytes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ESC_FP_X2").write_bytes(b"a local file of that name, not the model")
    assert hub.download_model("ESC_FP_X2").read_bytes() == fixture_bytes
    local = tmp_path / "mine.pth"
    local.write_bytes(fixture_bytes)
    with pytest.raises(hub.UnknownModelError, match="mine.pth"):  # a file is not something to download
        hub.download_model(str(local))


def test_esc_sr_upscale_with_an_official_name_downloads_once(release, tmp_path, capsys):
    from PIL import Image

    from esc_sr.cli import main

    image = tmp_path / "in.png"
    Image.new("RGB", (12, 10), (120, 80, 40)).save(image)
    assert main(["upscale", str(image), "-o", str(tmp_path / "out"), "-m", "ESC_light_X2"]) == 0
    assert main(["upscale", str(image), "-o", str(tmp_path / "out2"), "-m", "esc_light_x2"]) == 0
    assert len(release.requests) == 1  # the second run used the cache
    with Image.open(next((tmp_path / "out").iterdir())) as result:
        assert result.size == (24, 20)


def test_esc_sr_models_via_main(release, capsys):
    from esc_sr.cli import main

    assert main(["models"]) == 0
    assert "ESC_XL_DF2K_X4_FT" in capsys.readouterr().out
    assert main(["models", "--download", "nonsense"]) != 0
    assert capsys.readouterr().err.strip().startswith("esc-sr models: error: unknown model name: nonsense")
