"""JSON over HTTP to one vLLM OpenAI-compatible server, with bounded retries when it is unreachable.

Only ``requests``: a client of a remote server needs no vLLM installed.
"""

from __future__ import annotations

import time
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from areal_core.errors import ArealError, ServerUnreachableError

CONNECT_TIMEOUT = 5.0


class ServerRequestError(ArealError):
    """The server answered with an HTTP error; ``status`` and the server's own ``message``."""

    def __init__(self, address: str, path: str, status: int, message: str):
        self.address, self.path, self.status, self.message = address, path, status, message
        super().__init__(f"vLLM server at {address} answered {path} with HTTP {status}: {message}")


def normalise_address(address: str) -> str:
    """``host:port`` or ``http(s)://host:port[/]`` -> ``http(s)://host:port``."""
    address = address.strip().rstrip("/")
    return address if address.startswith(("http://", "https://")) else f"http://{address}"


def _server_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "detail" in body:
            return str(body["detail"])
    return str(body)


class VllmHttp:
    """Calls to the server at ``address``.

    ``api_key`` (never logged) is sent as a bearer token. ``timeout`` bounds the wait for one
    answer. A connection that fails is retried ``attempts`` times in all, sleeping ``backoff``
    seconds after the first failure and doubling each time, then ``ServerUnreachableError``
    names the address. A request that reached the server and timed out is not retried.
    """

    def __init__(
        self,
        address: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        attempts: int = 5,
        backoff: float = 0.25,
        pool_size: int = 32,
    ):
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.address = normalise_address(address)
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(pool_size, 1))
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def __repr__(self) -> str:
        return f"VllmHttp({self.address!r})"

    def request(self, method: str, path: str, payload: dict | None = None,
                *, timeout: float | None = None, attempts: int | None = None) -> Any:
        """Send one request; returns the decoded JSON body (or the text when it is not JSON).

        :raises ServerUnreachableError: no connection after the bounded retries.
        :raises ServerRequestError: the server answered with an HTTP error status.
        :raises ArealError: the server took longer than ``timeout`` to answer.
        """
        url = self.address + path
        attempts = attempts or self.attempts
        delay, started, last_error = self.backoff, time.monotonic(), None
        for attempt in range(attempts):
            try:
                response = self._session.request(
                    method, url, json=payload, timeout=(CONNECT_TIMEOUT, timeout or self.timeout)
                )
                break
            except requests.exceptions.ReadTimeout as exc:
                raise ArealError(
                    f"vLLM server at {self.address} did not answer {path} within "
                    f"{timeout or self.timeout:g} s; raise rollout.request_timeout or lower the load"
                ) from exc
            except requests.ConnectionError as exc:  # refused, reset, or the connect timed out
                last_error = exc
                if attempt + 1 < attempts:
                    time.sleep(delay)
                    delay *= 2
        else:
            raise ServerUnreachableError(
                f"vLLM server at {self.address} is unreachable: {method} {path} failed "
                f"{attempts} times over {time.monotonic() - started:.1f} s "
                f"({type(last_error).__name__}); check the address in rollout.servers and that "
                f"the server is running"
            )
        if response.status_code >= 400:
            raise ServerRequestError(self.address, path, response.status_code, _server_message(response))
        try:
            return response.json()
        except ValueError:
            return response.text

    def get(self, path: str, **kwargs) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, payload: dict, **kwargs) -> Any:
        return self.request("POST", path, payload, **kwargs)

    def close(self) -> None:
        self._session.close()
