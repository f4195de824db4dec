"""Startup hook that teaches spandrel (and so chaiNNer) the ESC architectures, lazily.

`esc-sr chainner install` copies this file into the site-packages of chaiNNer's Python as
``esc_sr_chainner_hook.py`` next to ``esc_sr_chainner_hook.pth`` (one line:
``import esc_sr_chainner_hook``), so it runs at every interpreter start of that Python.
chaiNNer imports no third-party plugins; a site-packages ``.pth`` is the one place it does not
control that its backend executes (see docs/spandrel_chainner.md).

Because it runs at *every* start (chaiNNer's pip runs included) it must cost nothing: it imports
only the standard library and puts a finder on ``sys.meta_path`` that reacts to exactly one event,
the import of ``spandrel``.  Once spandrel has finished importing, it calls
``esc_arch.spandrel.install()``, which adds the ESC architectures to ``spandrel.MAIN_REGISTRY``
(and never spandrel_extra_arches, which chaiNNer adds itself right after).  Without spandrel,
torch or esc_arch in that Python nothing is registered and nothing breaks; a failure to register
is printed as one line on stderr and never propagates into the importing program.

Standalone on purpose: this module must not import esc_arch (that imports torch) at start.
"""

import sys

# No importlib.abc here: importing it pulls in typing and importlib.resources (~90 ms at every
# interpreter start, measured); the import system only needs the duck-typed methods below.

MARKER = "esc-sr chainner hook"  # the uninstaller only removes files that carry this text
_TARGET = "spandrel"


def _warn(message: str) -> None:
    print(f"{MARKER}: {message}", file=sys.stderr)


def _prepare() -> None:
    """Before spandrel loads: let torchvision import next to a CPU-only torch (no-op elsewhere)."""
    try:
        from esc_sr.torchvision_shim import ensure_torchvision_importable
    except Exception:  # esc_arch or torch missing: spandrel will fail or succeed on its own
        return
    try:
        ensure_torchvision_importable()
    except Exception:
        pass  # torchvision's own error will surface from spandrel's import


def register() -> None:
    """Add the ESC architectures to spandrel's MAIN_REGISTRY; report (never raise) failures."""
    try:
        import esc_arch.spandrel
    except ImportError as error:
        _warn(f"ESC models will not load: esc_arch is not importable in {sys.executable} ({error})")
        return
    except Exception as error:  # a broken installation must not take chaiNNer's backend down
        _warn(f"ESC models will not load: importing esc_arch.spandrel failed ({type(error).__name__}: {error})")
        return
    try:
        esc_arch.spandrel.install()
        from esc_sr import cards

        cards.attach_to_spandrel()  # descriptors of the embedded models carry their card, as in ComfyUI
    except Exception as error:
        _warn(f"ESC models will not load: registering with spandrel failed ({type(error).__name__}: {error})")


class _RegisterAfterImport:
    """Wraps spandrel's loader: runs it, then registers ESC, then steps out of the way."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)  # an error here is spandrel's own and propagates as usual
        # Hand the module its real loader back (importlib.resources and friends look at it).
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        register()

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class SpandrelImportWatcher:
    """A ``sys.meta_path`` finder that only ever answers for ``spandrel``, once."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        uninstall_watcher()  # one shot: also keeps the lookup below from finding ourselves
        _prepare()
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterImport(spec.loader)
                return spec
        return None  # spandrel is not installed: the import fails exactly as it would without us


def uninstall_watcher() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, SpandrelImportWatcher)]


def activate() -> None:
    """Register now if spandrel is already imported, otherwise when it is."""
    if _TARGET in sys.modules:
        register()
    elif not any(isinstance(f, SpandrelImportWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, SpandrelImportWatcher())


# Only the installed copy hooks the interpreter; importing esc_sr._chainner_startup (tests, the
# installer reading this file) has no side effect.
if __name__ == "esc_sr_chainner_hook":
    activate()
