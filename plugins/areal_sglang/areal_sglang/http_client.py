"""JSON over HTTP to one SGLang server, with bounded retries where waiting can help."""

from __future__ import annotations

import time

import requests

from areal_core.errors import ServerUnreachableError


def normalise_address(address: str) -> str:
    """``host:port`` or ``http://host:port[/]`` -> ``http://host:port``."""
    address = address.strip().rstrip("/")
    if not address:
        raise ValueError("an empty server address; write host:port or http://host:port")
    if "://" not in address:
        address = f"http://{address}"
    return address


class HttpClient:
    """Talks to the server at ``base_url`` (``http://host:port``).

    :param timeout: seconds one request may take before it fails.
    :param api_key: sent as a bearer token when not empty (a server started with ``--api-key``).
    :param pool_size: connections kept open, at least the number of concurrent requests.
    """

    def __init__(self, base_url: str, *, timeout: float, api_key: str = "", pool_size: int = 32):
        self.base_url = normalise_address(base_url)
        self.timeout = timeout
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=pool_size)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def get(self, path: str, *, timeout: float | None = None) -> requests.Response:
        """GET ``path``; ServerUnreachableError when no answer comes."""
        try:
            return self._session.get(self.base_url + path, timeout=timeout or self.timeout)
        except requests.RequestException as exc:
            raise ServerUnreachableError(
                f"SGLang server {self.base_url} did not answer GET {path}: {exc}"
            ) from exc

    def post_json(self, path: str, payload: dict) -> requests.Response:
        """POST ``payload`` as JSON to ``path``; ServerUnreachableError when no answer comes."""
        try:
            return self._session.post(self.base_url + path, json=payload, timeout=self.timeout)
        except requests.RequestException as exc:
            raise ServerUnreachableError(
                f"SGLang server {self.base_url} did not answer POST {path}: {exc}"
            ) from exc

    def is_healthy(self) -> bool:
        """True when ``GET /health`` answers 200 within a few seconds."""
        try:
            return self._session.get(self.base_url + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def wait_healthy(self, *, attempts: int, first_delay: float = 0.5, max_delay: float = 8.0) -> None:
        """Poll ``/health`` up to ``attempts`` times, doubling the delay between tries.

        :raises ServerUnreachableError: when no try answered 200, naming the address and the fix.
        """
        delay = first_delay
        for attempt in range(attempts):
            if self.is_healthy():
                return
            if attempt + 1 < attempts:
                time.sleep(delay)
                delay = min(delay * 2, max_delay)
        raise ServerUnreachableError(
            f"SGLang server {self.base_url} did not answer GET /health after {attempts} tries; "
            f"check that it is running and reachable from here, or leave rollout.servers empty "
            f"to let areal launch one"
        )

    def close(self) -> None:
        self._session.close()
