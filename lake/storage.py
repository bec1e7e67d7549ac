"""Where a lake lives: a local directory or ``s3://bucket/prefix``.

Small JSON files (manifests, configs) go through fsspec and are written atomically
(temp file + rename locally, a single PUT on S3). Lance datasets get ``uri()`` plus
``storage_options`` so Lance talks to the same store directly.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import socket
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

import aiobotocore.session
import fsspec

from .errors import UserError

CLAIM = "claim.json"  # inside a named folder: who took the name (see LakeStorage.claim)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_name(name: str, what: str = "name") -> str:
    """Run/SAE/analysis names become path components: keep them boring."""
    if not NAME_RE.match(name or "") or ".." in name:
        raise UserError(f"invalid {what} {name!r}: use letters, digits, '_', '-', '.' (max 128, no '..')")
    return name


def _s3_settings() -> dict:
    """Credentials and endpoint from the standard AWS environment variables (never stored)."""
    return {
        "key": os.environ.get("AWS_ACCESS_KEY_ID"),
        "secret": os.environ.get("AWS_SECRET_ACCESS_KEY"),
        "token": os.environ.get("AWS_SESSION_TOKEN"),
        "endpoint": os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    }


S3_TIMEOUT_ENV = "SAELAKE_S3_TIMEOUT"
S3_TIMEOUT_DEFAULT = 60.0  # seconds


def s3_timeout() -> float:
    """The longest one S3 request may wait for the store, its retries included (seconds).

    From SAELAKE_S3_TIMEOUT (default 60). A stalled endpoint fails a command with the usual
    one-line error instead of hanging it, within a few times this: an operation may make several
    requests (Lance repeats a failed listing up to five times), and so does the clean-up after it.
    """
    raw = os.environ.get(S3_TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else S3_TIMEOUT_DEFAULT
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise UserError(
            f"{S3_TIMEOUT_ENV}={raw!r}: give the S3 time limit in seconds, a positive number "
            f"(default {S3_TIMEOUT_DEFAULT:g})"
        )
    return value


def _no_expect_continue(params: dict, **_) -> None:
    """botocore asks a stalled server for "100 Continue" before a PUT's body, and aiohttp waits
    for that answer with no time limit; without the header the read timeout bounds the PUT."""
    params["headers"].pop("Expect", None)


class LakeStorage:
    """File access for one lake root."""

    def __init__(self, root: str):
        root = str(root).rstrip("/")
        self.is_s3 = root.startswith("s3://")
        if self.is_s3:
            parsed = urlparse(root)
            if not parsed.netloc:
                raise UserError(f"bad lake URI {root!r}: expected s3://bucket/prefix")
            self.root = root
            s = _s3_settings()
            self.endpoint = s["endpoint"]
            client_kwargs = {"endpoint_url": s["endpoint"]} if s["endpoint"] else {}
            limit = s3_timeout()
            # Every S3 request gives up within the limit, its retries included. botocore (fsspec):
            # two attempts, each connecting and waiting for bytes at most a quarter of it. Lance
            # (object_store): each attempt at most half of it (Lance's own default per request at the
            # default limit), quick retries of errors such as 503 only within the first half.
            session = aiobotocore.session.AioSession()
            session.register("before-call.s3", _no_expect_continue)
            self.fs = fsspec.filesystem(
                "s3",
                key=s["key"],
                secret=s["secret"],
                token=s["token"],
                client_kwargs=client_kwargs,
                session=session,
                config_kwargs={
                    "connect_timeout": limit / 4,
                    "read_timeout": limit / 4,
                    "retries": {"total_max_attempts": 2, "mode": "standard"},
                },
                skip_instance_cache=True,
            )
            self.fs.retries = 1  # s3fs's own retry loop (5 by default) would multiply botocore's
            half_ms = max(1, int(limit * 500))
            self.storage_options = {
                "region": s["region"],
                "connect_timeout": f"{half_ms // 2}ms",
                "timeout": f"{half_ms}ms",
                "client_max_retries": "3",
                "client_retry_timeout": f"{max(1, round(limit / 2))}",
            }
            if s["key"]:
                self.storage_options |= {"access_key_id": s["key"], "secret_access_key": s["secret"]}
            if s["token"]:
                self.storage_options["session_token"] = s["token"]
            if s["endpoint"]:
                self.storage_options |= {"endpoint": s["endpoint"], "aws_virtual_hosted_style_request": "false"}
                if s["endpoint"].startswith("http://"):
                    self.storage_options["allow_http"] = "true"
            self._check_s3(parsed.netloc)
        else:
            path = Path(root.removeprefix("file://")).expanduser().resolve()
            if path.exists() and not path.is_dir():
                raise UserError(f"lake path {path} is a file: give a directory (it is created if missing)")
            self.root = str(path)
            self.fs = fsspec.filesystem("file")
            self.storage_options = None
            self.endpoint = None

    def _check_s3(self, bucket: str) -> None:
        where = self.endpoint or "the default AWS endpoint"
        try:
            self.fs.ls(bucket, refresh=True)
        except FileNotFoundError:
            raise UserError(f"S3 bucket {bucket!r} does not exist at {where}: create it first") from None
        except PermissionError:
            raise UserError(
                f"S3 at {where} refused access to bucket {bucket!r}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            ) from None
        except Exception as e:  # botocore raises many types; the class name says enough
            name = type(e).__name__
            if "Credential" in name or "Auth" in str(e) or "InvalidAccessKeyId" in str(e) or "Forbidden" in str(e):
                raise UserError(
                    f"S3 at {where} refused the credentials for bucket {bucket!r}: check "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
                ) from None
            raise UserError(
                f"cannot reach S3 endpoint {where} ({name}): check AWS_ENDPOINT_URL and that the server is up"
            ) from None

    # paths -------------------------------------------------------------------------------
    def uri(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.uri(*parts))

    def listdir(self, *parts: str) -> list[str]:
        """Names of the entries directly under a folder ([] if missing)."""
        try:
            entries = (
                self.fs.ls(self.uri(*parts), detail=False, refresh=True)
                if self.is_s3
                else self.fs.ls(self.uri(*parts), detail=False)
            )
        except FileNotFoundError:
            return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})

    # small files -------------------------------------------------------------------------
    def read_json(self, *parts: str) -> dict | None:
        try:
            with self.fs.open(self.uri(*parts), "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as e:
            raise UserError(f"{self.uri(*parts)} is not valid JSON ({e}): restore it or remove the entry") from None

    def write_json(self, obj: dict, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), *parts)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Atomic: readers see the old file or the new one, never a torn one."""
        target = self.uri(*parts)
        if self.is_s3:
            self.fs.pipe(target, data)  # a single PUT is atomic on S3
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def create_exclusive(self, data: bytes, *parts: str) -> bool:
        """Create a file with ``data`` only if it is absent, atomically; False if it existed.

        Locally: the data goes to a temp file that is hard-linked to the target (link fails if the
        target exists, and a reader never sees it half-written). On S3: a conditional PUT
        (``If-None-Match: *``), which the store itself refuses when the key exists.
        """
        target = self.uri(*parts)
        if self.is_s3:
            try:
                self.fs.pipe(target, data, mode="create")
            except FileExistsError:
                # a retried PUT may find its own first attempt: that one was ours
                return self._read_bytes(target) == data
            except OSError as e:
                if "NotImplemented" in str(e) or "501" in str(e):
                    raise UserError(
                        f"the S3 endpoint {self.endpoint or 'AWS'} refuses conditional writes "
                        "(If-None-Match), which saelake needs to claim names atomically"
                    ) from None
                raise
            return True
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _read_bytes(self, target: str) -> bytes | None:
        try:
            return self.fs.cat_file(target)
        except FileNotFoundError:
            return None

    # names ---------------------------------------------------------------------------------
    def claim(self, *parts: str, owner: str) -> None:
        """Take the name ``parts`` (a folder: ``saes/<name>``, ``analyses/<name>``) for good, atomically.

        Writes ``<parts>/claim.json`` (owner, host, pid, time) with :meth:`create_exclusive`, so of
        several processes claiming one name at once exactly one gets it, on local disk and on S3;
        the others get a one-line UserError. A name this process claimed but wrote nothing else
        under (it failed first) is given back at exit (:func:`release_unused_claims`).
        """
        token = uuid.uuid4().hex
        record = {
            "owner": owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "token": token,
        }
        if not self.create_exclusive(json.dumps(record, indent=2).encode(), *parts, CLAIM):
            held = self.read_json(*parts, CLAIM) or {}
            what = {"saes": "SAE name", "analyses": "analysis name", "runs": "run name"}.get(parts[0], "name")
            raise UserError(
                f"{what} {parts[-1]!r} is taken in {self.root} (claimed by `{held.get('owner')}` on "
                f"{held.get('host')}, pid {held.get('pid')}, at {held.get('at')}): pick another --name"
            )
        if not _CLAIMED:
            atexit.register(release_unused_claims)
        _CLAIMED.append((self, parts, token))

    def remove(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.rm(self.uri(*parts), recursive=True)

    def local_cache_key(self) -> str:
        """A file-name-safe key for per-root local state (the catalog of a remote lake)."""
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.root).strip("-")[-60:]
        return f"{slug}-{hashlib.sha1(self.root.encode()).hexdigest()[:10]}"


def saelake_home() -> Path:
    """Local state that is not part of any lake: model cache, catalogs of remote lakes."""
    return Path(os.environ.get("SAELAKE_HOME", Path.home() / ".cache" / "saelake"))


_CLAIMED: list[tuple[LakeStorage, tuple[str, ...], str]] = []  # names this process claimed


def release_unused_claims() -> None:
    """Give back the names this process claimed but wrote nothing under (it stopped on an error
    first), so the same command can be run again. Runs at exit and when the CLI reports an error."""
    while _CLAIMED:
        st, parts, token = _CLAIMED.pop()
        try:
            if st.listdir(*parts) == [CLAIM] and (st.read_json(*parts, CLAIM) or {}).get("token") == token:
                st.fs.rm(st.uri(*parts, CLAIM))
        except Exception:  # noqa: BLE001 -- storage unreachable at exit: the claim stays, and says whose it is
            pass
