"""``hf://ORG/REPO[/SUBFOLDER][@REVISION]``: a dictionary on the Hugging Face hub, through
``huggingface_hub``'s own cache (``HF_HUB_CACHE`` / ``HF_HOME``). With ``HF_HUB_OFFLINE`` set
nothing is downloaded: the cache must already hold it. Only the subfolder's files are fetched.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from saelake.lake import UserError

PREFIX = "hf://"
_RE = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<sub>[^@]+?))?/?(?:@(?P<rev>[\w./-]+))?$")
TIMEOUT_S = 30  # each hub request (metadata); file downloads use huggingface_hub's HF_HUB_DOWNLOAD_TIMEOUT


@dataclass(frozen=True)
class HubSource:
    repo: str
    subfolder: str | None
    revision: str | None

    def __str__(self) -> str:
        return (
            PREFIX
            + self.repo
            + (f"/{self.subfolder}" if self.subfolder else "")
            + (f"@{self.revision}" if self.revision else "")
        )


def is_hub(source: str) -> bool:
    return source.startswith(PREFIX)


def parse(source: str) -> HubSource:
    m = _RE.match(source)
    if not m or ".." in source.split("@")[0].split("/"):
        raise UserError(f"{source!r} is not a hub address: write hf://ORG/REPO[/SUBFOLDER][@REVISION]")
    return HubSource(m.group("repo"), m.group("sub"), m.group("rev"))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> str | None:
    """The hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None


def fetch(source: str) -> tuple[Path, str]:
    """(local folder holding the dictionary, its address with the resolved commit)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    src = parse(source)
    patterns = [f"{src.subfolder}/*", f"{src.subfolder}/**"] if src.subfolder else None
    try:
        root = Path(
            snapshot_download(
                src.repo,
                revision=src.revision,
                allow_patterns=patterns,
                cache_dir=cache_dir(),
                local_files_only=offline(),
                etag_timeout=TIMEOUT_S,
            )
        )
    except LocalEntryNotFoundError:
        raise UserError(
            f"{src} is not in the Hugging Face cache"
            + (
                " and HF_HUB_OFFLINE is set: unset it to download, or fill the cache on a machine with a network"
                if offline()
                else " and the hub cannot be reached"
            )
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{src}: no such repository on the hub (or it is private: log in with `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"{src}: no revision {src.revision!r} in {src.repo}") from None
    except (EntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise UserError(
            f"{src}: the hub download failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        ) from None
    folder = root / src.subfolder if src.subfolder else root
    if not folder.is_dir() or not any(folder.iterdir()):
        raise UserError(
            f"{src}: the repository has no folder {src.subfolder!r}"
            if src.subfolder
            else f"{src}: the repository is empty"
        )
    return folder, f"{PREFIX}{src.repo}" + (f"/{src.subfolder}" if src.subfolder else "") + f"@{root.name}"
