"""The ESC_SR_* on/off switches (issue 26): one parser (esc_runtime.switches) for ESC_SR_NATIVE, ESC_SR_ONEDNN and
ESC_SR_FFT; the usual spellings of off and on in any case, anything else refused in one line naming the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

import esc_arch
from esc_runtime import native, onednn, spectral, switches

SWITCHES = ("ESC_SR_NATIVE", "ESC_SR_ONEDNN", "ESC_SR_FFT")


@pytest.mark.parametrize("name", SWITCHES)
@pytest.mark.parametrize("value", ["0", "false", "FALSE", "No", " off ", "Off"])
def test_the_usual_spellings_of_off(name: str, value: str) -> None:
    assert switches.enabled(name, {name: value}) is False


@pytest.mark.parametrize("name", SWITCHES)
@pytest.mark.parametrize("value", [None, "", "  ", "1", "true", "TRUE", "yes", "On"])
def test_unset_empty_and_the_usual_spellings_of_on(name: str, value: str | None) -> None:
    assert switches.enabled(name, {} if value is None else {name: value}) is True


@pytest.mark.parametrize("value", ["flase", "2", "disable", "0.0", "n"])
def test_any_other_value_is_refused_in_one_line_naming_the_variable(value: str) -> None:
    with pytest.raises(switches.SwitchError) as caught:
        switches.enabled("ESC_SR_FFT", {"ESC_SR_FFT": value})
    message = str(caught.value)
    assert message.startswith(f"ESC_SR_FFT={value!r} is not an on/off value") and "\n" not in message
    assert isinstance(caught.value, esc_arch.ESCError)


def test_each_fast_path_reads_its_switch_through_the_one_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """``false`` and ``OFF`` switch the paths off, as ``0`` always did (before, they left them on)."""
    try:
        monkeypatch.setenv("ESC_SR_FFT", "false")
        monkeypatch.setenv("ESC_SR_ONEDNN", "OFF")
        spectral.enabled.cache_clear()
        onednn.available.cache_clear()
        assert spectral.enabled() is False and onednn.available() is False
        monkeypatch.delenv(native.ENV, raising=False)
        monkeypatch.setenv("ESC_SR_NATIVE", "no")
        assert native._choice() == ("off", "ESC_SR_NATIVE=no")
        monkeypatch.setenv(native.ENV, "False")  # the variant setting takes the same spellings of off
        assert native._choice()[0] == "off"
    finally:
        monkeypatch.undo()
        spectral.enabled.cache_clear()
        onednn.available.cache_clear()


def test_a_misspelt_switch_stops_the_command_with_one_line(tmp_path) -> None:
    """`esc-sr` with ESC_SR_FFT=flase: not silently on; one line naming the variable, exit status 1, no traceback."""
    model = tmp_path / "tiny.safetensors"
    import esc_sr

    esc_sr.save_model(esc_arch.esc_tiny(2, dim=16, pdim=4, n_blocks=1, conv_blocks=1, num_heads=1), model)
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (12, 10), (30, 90, 200)).save(image)
    env = {"PATH": "/usr/bin:/bin", "ESC_SR_FFT": "flase", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "esc_sr.cli", "upscale", str(image), "-o", str(tmp_path / "out"),
                           "-m", str(model)], capture_output=True, text=True, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stderr
    assert any(line.startswith("esc-sr upscale: error: ESC_SR_FFT='flase' is not an on/off value") for line in lines), \
        proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
