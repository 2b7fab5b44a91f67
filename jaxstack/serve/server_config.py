"""The HTTP server's settings, without any web package: who may use it (API keys from
``--api-key`` or ``JAXSTACK_API_KEY``) and how much one client can take. ``jaxstack serve``
builds them from its flags before anything loads."""

import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

API_KEY_ENV = "JAXSTACK_API_KEY"
"""Environment variable with the accepted API keys, comma-separated."""


def check_api_keys(keys: Iterable[str]) -> tuple[str, ...]:
    """``keys`` as a tuple, each checked to fit an HTTP header.

    Raises:
        ValueError: an empty key, or one with spaces, commas or non-printable characters.
    """
    keys = tuple(keys)
    for number, key in enumerate(keys, 1):
        if not key or not key.isascii() or not key.isprintable() or " " in key or "," in key:
            raise ValueError(
                f"API key number {number} is empty or has spaces, commas or characters that "
                "are not printable ASCII; use letters, digits and -_.~+/="
            )
    return keys


def api_keys_from(flags: Iterable[str] | None, environ: Mapping[str, str] = os.environ):
    """The keys to accept: those given as ``--api-key`` flags, else those in
    ``JAXSTACK_API_KEY`` (comma-separated), else none (no authentication)."""
    if flags:
        return check_api_keys(flags)
    listed = environ.get(API_KEY_ENV, "")
    return check_api_keys(key.strip() for key in listed.split(",") if key.strip())


def exposure_warning(host: str, api_keys: Iterable[str]) -> str | None:
    """A warning when ``host`` is reachable from other machines and no API key is set."""
    if tuple(api_keys) or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to anything
        pass
    return (
        f"serving on {host} without an API key: anyone who can reach this port can use the "
        f"model; set {API_KEY_ENV} (or --api-key) and put a TLS proxy in front"
    )


@dataclass(frozen=True)
class ServerConfig:
    """Who may use the server and how much one client can take (``jaxstack serve`` flags)."""

    api_keys: tuple[str, ...] = ()
    """Keys accepted as ``Authorization: Bearer <key>`` on ``/v1/*``; empty: no auth."""
    protect_metrics: bool = False
    """Require a key on ``/metrics`` too (``/health`` is always open)."""
    max_body_bytes: int = 4 * 2**20
    """Largest request body; a larger one is a 413 before it is read."""
    max_streams: int = 256
    """Streamed responses open at once; one more is a 429 with ``Retry-After``."""
    stream_timeout_s: float = 30.0
    """A streaming client that reads nothing for this long (its socket buffers full) has its
    request cancelled and its KV pages freed."""
    retry_after_s: int = 1
    """``Retry-After`` of a 429."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_keys", check_api_keys(self.api_keys))
        flags = {"max_body_bytes": "max-body-mb", "max_streams": "max-streams",
                 "stream_timeout_s": "stream-timeout"}  # fmt: skip
        for name, flag in flags.items():
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0 (serve --{flag})")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s={self.retry_after_s} must be >= 0")
