"""apiyi-proxy: an OpenAI-compatible, validating reverse proxy for the apiyi image API."""

from __future__ import annotations

__version__ = "0.1.0"
