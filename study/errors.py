"""What the study says about errors, in one place: one-line descriptions, redacted URLs, tracking-server outages.

Every other module of study/ may import this one; it imports nothing of study/, so it can never close an import
circle.
"""
from __future__ import annotations

import re
import time
import traceback
import urllib.request

import requests
from mlflow.exceptions import MlflowException, RestException

WORKER_DIED = "worker process died during the trial"  # a trial's fail_reason, and its MLflow run's failure_reason


class RayError(ValueError):
    """A Ray cluster that cannot be used, or a task that could not join the study; the message names it."""


def first_line(exc: BaseException) -> str:
    """The error's message, first line only (or its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe_error(exc: BaseException) -> str:
    """`Type: first line`: a trial's failure_reason tag and the console's line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def transport_gist(exc: BaseException) -> str:
    """The gist of a transport error (MLflow's wrapping of urllib3's runs to a paragraph)."""
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if errno:
        return errno.group(0)
    if "timeout" in text.lower() or "timed out" in text.lower():
        return "timed out"
    return first_line(exc)[:120]


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def redact(url: str) -> str:
    """The URL with any password replaced, for logs, params and reports."""
    return re.sub(r"(://[^:/@]+:)[^@/]*@", r"\1***@", url)


def now_ms() -> int:
    """MLflow's timestamps: milliseconds since the epoch."""
    return int(time.time() * 1000)


def is_outage(exc: BaseException) -> bool:
    """The server away (refused, timed out, 5xx), as opposed to a request it refused (4xx) or a local error."""
    if isinstance(exc, requests.HTTPError):  # artifact uploads raise these
        return exc.response is None or exc.response.status_code >= 500
    if isinstance(exc, OSError):  # requests' ConnectionError and Timeout too
        return True
    if isinstance(exc, MlflowException):
        # MLflow wraps transport failures as "API request to ... failed"; an in-process MlflowException is 500 too
        from_server = isinstance(exc, RestException) or str(exc.message).startswith("API request to")
        return from_server and exc.get_http_status_code() >= 500
    return False


def health_error(tracking_uri: str, timeout: float) -> OSError | None:
    """None when the tracking server's /health answers within timeout seconds, else why not."""
    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout).close()
        return None
    except OSError as exc:
        return exc
