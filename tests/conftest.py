"""The tests read ../shared (golden fixtures, images) beside the checkout; golden.py computes the path once.

``--device`` (default ``cpu``; ``cuda`` or ``cuda:N`` selects a GPU) is the device of the tests that take the
``device`` fixture: the golden outputs per backend, half precision and the training step.  Those tests carry the
``device`` marker, so ``pytest --device cuda -m device`` runs exactly them on the GPU (``benchmarks.gpu_check``
does).  On CUDA, TF32 is off for the whole session: fp32 means fp32, as the golden tolerance assumes.
"""

from __future__ import annotations

import pytest

from golden import DATA_DIR, GOLDEN_DIR, GOLDEN_FROM_ENV


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu",
                     help="device of the tests that take the 'device' fixture: cpu (default), cuda or cuda:N")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "device: takes the 'device' fixture, so it runs on --device")


def pytest_sessionstart(session: pytest.Session) -> None:
    # Golden fixtures packed elsewhere (ESC_SR_GOLDEN, e.g. on a device machine): only they are needed there.
    needed = (GOLDEN_DIR,) if GOLDEN_FROM_ENV else (GOLDEN_DIR, DATA_DIR)
    missing = [str(p) for p in needed if not p.is_dir()]
    if missing:
        raise pytest.UsageError(f"missing {', '.join(missing)}: the tests need ../shared beside the checkout")
    name = session.config.getoption("--device")
    if name != "cpu":
        import torch

        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise pytest.UsageError(f"--device {name}: {exc}") from None
        if device.type != "cuda" or not torch.cuda.is_available():
            raise pytest.UsageError(f"--device {name}: only cpu and a visible CUDA device are supported "
                                    f"(torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})")


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest):
    """The ``torch.device`` of ``--device``; on CUDA with TF32 off (matmul and cuDNN) for the session."""
    import torch

    device = torch.device(request.config.getoption("--device"))
    if device.type != "cuda":
        yield device
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield device
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _autograd_is_left_as_found():
    """A test that switches autograd off for the process (and does not switch it back) fails here, by name, instead
    of a later test that trains."""
    import torch

    yield
    leaked = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "this test left autograd switched off"
