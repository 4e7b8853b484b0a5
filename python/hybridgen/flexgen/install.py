"""Finding FlexGen. The drop-in replaces internals of one release, FlexGen 0.1.8 (the last one on
PyPI), so any other version is refused rather than patched blindly."""

from __future__ import annotations

import importlib.metadata

__all__ = ["SUPPORTED_VERSION", "INSTALL_HINT", "flexgen_version", "require_flexgen"]

SUPPORTED_VERSION = "0.1.8"
INSTALL_HINT = f"pip install 'hybridgen[flexgen]'  (or: pip install flexgen=={SUPPORTED_VERSION})"


def flexgen_version() -> str:
    """The installed FlexGen version; ImportError with the install command if there is none."""
    try:
        return importlib.metadata.version("flexgen")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"FlexGen is not installed: {INSTALL_HINT}") from None


def require_flexgen():
    """FlexGen's ``flex_opt`` and ``pytorch_backend`` modules, after checking the version.

    ``flex_opt`` is imported first: it resolves a circular import between ``pytorch_backend`` and
    ``compression`` (``fix_recursive_import``) that breaks ``pytorch_backend`` imported alone.
    """
    version = flexgen_version()
    if version != SUPPORTED_VERSION:
        raise ImportError(
            f"hybridgen.flexgen replaces internals of FlexGen {SUPPORTED_VERSION}, but FlexGen {version} is "
            f"installed: pip install flexgen=={SUPPORTED_VERSION}"
        )
    from flexgen import flex_opt, pytorch_backend

    return flex_opt, pytorch_backend
