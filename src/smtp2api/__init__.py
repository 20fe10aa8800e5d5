"""smtp2api: an SMTP front door for HTTPS email APIs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("smtp2api")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
