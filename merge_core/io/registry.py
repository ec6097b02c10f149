"""Opening a storage from a URI: one backend per scheme, one instance per process and URI.

A worker process runs many tasks (Ray reuses workers), and the driver touches the same base
and adapters while it checks, plans and publishes: opening each once keeps one S3 client and
its connection pool per process instead of one per call. Backends are imported only when their
scheme is used, so a run on local files never loads boto3.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import threading

from merge_core.errors import InputError
from merge_core.io.storage import Storage, StorageOptions

# scheme → "module:class"; a local path has no scheme
BACKENDS = {"s3": "merge_core.io.s3:S3Storage", "": "merge_core.io.local:LocalStorage"}

# The environment a backend reads its endpoint and credentials from when it is opened: changed
# settings (a long-lived Python process whose credentials rotate) open the storage anew.
SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_REGION")
SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")  # kept in the key only as a digest

_OPEN: dict[tuple, Storage] = {}
_LOCK = threading.Lock()


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else ""


def open_storage(uri: str, options: StorageOptions = StorageOptions()) -> Storage:
    """The storage at `uri`, opened once per process for these options and settings."""
    scheme = scheme_of(uri)
    if scheme not in BACKENDS:
        known = ", ".join(f"{s}://" for s in BACKENDS if s)
        raise InputError(uri, f"unsupported URI scheme {scheme!r}", f"use a local path or {known}")
    key = (uri, options, _settings() if scheme else ())
    with _LOCK:
        storage = _OPEN.get(key)
        if storage is None:
            module, _, name = BACKENDS[scheme].partition(":")
            backend = getattr(importlib.import_module(module), name)
            storage = _OPEN[key] = backend(uri) if not scheme else backend(uri, options)
        return storage


def _settings() -> tuple:
    secrets = "\0".join(os.environ.get(k, "") for k in SECRETS)
    return (*(os.environ.get(k) for k in SETTINGS), hashlib.sha256(secrets.encode()).hexdigest())
