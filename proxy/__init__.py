"""apiyi-proxy: an OpenAI-compatible, validating reverse proxy for the apiyi image API."""

from __future__ import annotations

from importlib import metadata


def __getattr__(name: str) -> str:
    # The version lives once, in pyproject.toml; read from the installed metadata on
    # first use rather than at import.
    if name == "__version__":
        try:
            return metadata.version("apiyi-proxy")
        except metadata.PackageNotFoundError:
            return "0+unknown"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
