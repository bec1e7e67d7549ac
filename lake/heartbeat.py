"""Heartbeats of long-running writers (a training SAE), and when a record counts as stalled.

A writer stamps its record (e.g. an SAE's config.json) with ``beat()``: the UTC time, the
interval it means to keep, and which process it is. A reader calls ``stalled(record)``: a record
whose status is still "training" is stalled when its heartbeat is older than ``stale_after``
(``STALE_FACTOR`` x the writer's interval, at least ``STALE_MIN_S``; env ``SAELAKE_STALE_AFTER``
seconds overrides it), or at once when its process is visibly gone (same host and PID namespace,
no such PID). Records written before heartbeats existed fall back to their ``updated`` time.
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime

HEARTBEAT_S = 30.0  # a writer beats at least this often (env SAELAKE_HEARTBEAT_S), and at every checkpoint
STALE_FACTOR = 4.0  # missed beats before a record is stalled
STALE_MIN_S = 120.0  # never sooner than this (a slow object store, a long step)
RUNNING = ("training",)


def heartbeat_s() -> float:
    return float(os.environ.get("SAELAKE_HEARTBEAT_S") or HEARTBEAT_S)


def _pid_namespace() -> str | None:
    """Host name + PID namespace: where a PID means the same process (Linux; None elsewhere)."""
    try:
        return f"{socket.gethostname()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def beat(every_s: float) -> dict:
    """The fields a writer puts in its record at each heartbeat."""
    return {
        "heartbeat": datetime.now(UTC).isoformat(timespec="seconds"),
        "heartbeat_every_s": round(every_s, 3),
        "pid": os.getpid(),
        "pid_namespace": _pid_namespace(),
    }


def stale_after(record: dict) -> float:
    """Seconds without a heartbeat after which a running record is stalled."""
    env = os.environ.get("SAELAKE_STALE_AFTER")
    if env:
        return float(env)
    return max(STALE_MIN_S, STALE_FACTOR * float(record.get("heartbeat_every_s") or HEARTBEAT_S))


def _process_gone(record: dict) -> bool:
    pid, where = record.get("pid"), record.get("pid_namespace")
    if not isinstance(pid, int) or not where or where != _pid_namespace():
        return False  # another machine or container: only the heartbeat's age can tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, not ours to signal
        return False
    return False


def stalled(record: dict, now: datetime | None = None) -> str | None:
    """``"stalled (no heartbeat since ...)"`` for a running record that stopped beating, else None."""
    if record.get("status") not in RUNNING:
        return None
    last = record.get("heartbeat") or record.get("updated") or record.get("created")
    try:
        t = datetime.fromisoformat(str(last))
        t = t if t.tzinfo else t.replace(tzinfo=UTC)
    except ValueError:
        return "stalled (no heartbeat recorded)"
    age = ((now or datetime.now(UTC)) - t).total_seconds()
    gone = _process_gone(record)
    if not gone and age <= stale_after(record):
        return None
    why = f"its process {record['pid']} is gone" if gone else f"limit {stale_after(record):.0f} s"
    return f"stalled (no heartbeat since {t.strftime('%Y-%m-%d %H:%M:%S')} UTC, {_ago(age)} ago; {why})"


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h" if s < 172800 else f"{s // 86400} days"


def shown_status(record: dict) -> str:
    """The status to display: "stalled (...)", "training 40% (1,600 / 4,000 tokens)", or the stored one."""
    why = stalled(record)
    if why:
        return why
    p = record.get("progress") or {}
    if record.get("status") in RUNNING and p.get("tokens_total"):
        return (
            f"{record['status']} {100 * p['tokens'] / p['tokens_total']:.0f}% "
            f"({p['tokens']:,} / {p['tokens_total']:,} tokens)"
        )
    return str(record.get("status"))
