"""The scheduler's state file (``--state-file``): what it has learned survives a restart.

The file holds :meth:`SchedulerCore.export_state` (the calibration of the shared cost model, each
user's own link estimate and margin keyed by that user, the edge spans reports measured, the plans
awaiting a report) as plain JSON, with a format name, a version and the digest of the cost profile
the calibration is relative to. It is written whole to a temporary file beside it, flushed and
renamed over the old one (``os.replace``), so a reader sees the old state or the new one, never
half of one; the service saves every ``--state-interval`` seconds when something changed, and on
shutdown. At start a missing file means a first start; a file that cannot be restored (not JSON,
another format or version, saved with another cost profile, a value out of range) is ignored with
one warning line that says why, and the service starts fresh (the next save replaces it).

Nothing here imports gRPC; JSON only (no pickle: a state file is data, never code).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from services.scheduler.decide.costs import CostProfile
from services.scheduler.live.core import SchedulerCore

log = logging.getLogger("tandem.scheduler")
FORMAT = "tandem-scheduler-state"
VERSION = 1
MAX_STATE_BYTES = 256 << 20  # a file beyond this is not one this scheduler wrote (bounded tables)


class StateFileError(ValueError):
    """A state file that is not restored; the message says why (one line)."""


def profile_digest(costs: CostProfile) -> str:
    """The cost profile a calibration is relative to, as a digest of its content (the built-in
    profile included): calibrated scales of one profile mean nothing for another."""
    canonical = json.dumps(costs.to_dict(), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def document(core: SchedulerCore) -> dict[str, Any]:
    """The whole file's content for ``core`` now."""
    return {"format": FORMAT, "version": VERSION, "cost_profile": profile_digest(core.prior_costs),
            "saved_at": core.wall(), "state": core.export_state()}


def save(core: SchedulerCore, path: str | Path) -> None:
    """Writes ``core``'s state to ``path`` atomically (a temporary file in the same directory,
    flushed to disk, then renamed over it). Raises OSError (the temporary file removed)."""
    path = Path(path)
    data = json.dumps(document(core), separators=(",", ":")).encode()
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    try:  # the rename itself on disk (best effort: not every file system lets a directory be opened)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        pass


def read(path: str | Path, digest: str) -> dict[str, Any] | None:
    """The state saved at ``path`` for the cost profile ``digest``; None when there is no file.
    Raises StateFileError saying why a file cannot be used."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            raise StateFileError(f"larger than {MAX_STATE_BYTES >> 20} MiB")
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"cannot be read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFileError(f"is not JSON ({exc})") from None
    except RecursionError:
        raise StateFileError("is not JSON (nested too deep)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StateFileError(f"is not a {FORMAT} file")
    if data.get("version") != VERSION:
        raise StateFileError(f"is version {data.get('version')!r:.20}; this scheduler reads version {VERSION}")
    if data.get("cost_profile") != digest:
        raise StateFileError(f"was saved with another cost profile ({data.get('cost_profile')!r:.40}; running "
                             f"{digest}): its calibration does not apply")
    if set(data) != {"format", "version", "cost_profile", "saved_at", "state"}:
        raise StateFileError(f"has unexpected keys {sorted(set(data))}")
    return data["state"]


def restore(core: SchedulerCore, path: str | Path) -> bool:
    """Restores ``core`` from ``path`` when it holds a usable state; else logs one warning saying why
    (nothing restored: the service starts fresh). True when restored."""
    try:
        state = read(path, profile_digest(core.prior_costs))
        if state is None:
            log.info("state file %s: none yet; starting fresh", path)
            return False
        core.restore_state(state)
    except (StateFileError, ValueError) as exc:
        log.warning("state file %s %s; ignored, starting fresh (the next save replaces it)", path, _why(exc))
        return False
    log.info("state file %s: restored (%s)", path, summary(core))
    return True


def _why(exc: Exception) -> str:
    return str(exc) if isinstance(exc, StateFileError) else f"cannot be restored: {exc}"


def summary(core: SchedulerCore) -> str:
    """What a restore brought back, in words (for the log)."""
    state = core.export_state()
    estimates = len(state["calibration"]["estimates"])
    return (f"{estimates} calibrated figures, {len(state['links'])} users' links, {len(state['margins'])} users' "
            f"margins, {len(state['occupancy'])} edge spans, {len(state['pending'])} plans awaiting a report")
