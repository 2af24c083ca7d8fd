"""The device's estimate of its link to each edge, measured from the handoffs it receives.

Every edge round gives one :class:`LinkSample` (services/ue_client/transport.py measures it):

- **round trip**: from opening the call to the edge's first answer (its "queued" event, sent as
  soon as the request is admitted). It includes connecting, as every round does: it is the fixed
  cost of a round that the scheduler's cost model calls the RTT.
- **throughput**: the handoff's bytes over the time from the edge's last progress event (a tiny
  message sent just before the handoff, on the same stream) to the handoff's last byte. The edge
  sends SD-sized handoffs (11-67 KB) as one 256 KB chunk, so first-to-last chunk would time
  nothing; timed from the last progress event the one-way delay cancels and what is left is the
  bytes on the wire (plus the edge's encoding, which makes it an effective rate). A handoff under
  ``MIN_RATE_BYTES`` gives a round trip only: its arrival time is the stacks', not the link's.

A :class:`LinkBook` keeps, per edge, a window of each quantity (tandem/link.py: medians, bounds,
a minimum sample count) for the last ``MAX_EDGES`` edges used.

The device service keeps its book in memory; the CLI (one image per process, its run's link a
:class:`LinkState`) persists it as JSON (:func:`state_path`: ``$TANDEM_LINK_STATE``, else
``$XDG_CACHE_HOME/tandem/links.json``), written atomically; a corrupt file is ignored with one
warning. An edge's saved estimate is dropped once it is ``MAX_AGE_S`` old (a link belongs to
where the device is now: a laptop changes networks within hours). Pure logic, no gRPC.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tandem.link import WINDOW, LinkEstimate, LinkWindow, is_number, rate_bps
from tandem.lru import Lru

MAX_EDGES = 64  # edges remembered; the least recently used is forgotten
STATE_ENV = "TANDEM_LINK_STATE"
STATE_VERSION = 1
MAX_AGE_S = 3600.0  # a saved estimate older than this (since its last sample) is not used


@dataclass(frozen=True)
class LinkSample:
    """One edge round as the device measured it."""

    nbytes: int  # the handoff's bytes
    transfer_s: float  # last progress event -> last handoff byte (0: not timed)
    rtt_s: float  # call opened -> the edge's first event

    @property
    def rate_bps(self) -> float | None:
        """Throughput in bit/s, or None when this handoff cannot tell (too small, not timed)."""
        return rate_bps(self.nbytes, self.transfer_s)


@dataclass
class _EdgeLink:
    window: LinkWindow
    updated: float  # wall-clock time of its last sample


class LinkBook:
    """Per-edge link estimates, at most ``max_edges`` (least recently used forgotten)."""

    def __init__(self, max_edges: int = MAX_EDGES, clock: Callable[[], float] = time.time):
        self._edges: Lru[str, _EdgeLink] = Lru(max_edges)
        self._clock = clock

    def record(self, edge: str, sample: LinkSample) -> None:
        link = self._edges.peek(edge) or _EdgeLink(LinkWindow(), 0.0)
        link.window.add(sample.nbytes, sample.transfer_s, sample.rtt_s)
        link.updated = self._clock()
        self._edges.put(edge, link)  # now the most recently used

    def estimate(self, edge: str | None = None) -> LinkEstimate:
        """The estimate for ``edge``; for None, the edge measured last (before a plan names one,
        the CLI does not know which edge it will get: the last one is the best guess)."""
        if edge is None:
            edge = self._edges.newest()
        link = self._edges.peek(edge) if edge is not None else None
        return link.window.estimate() if link is not None else LinkEstimate()

    def to_dict(self) -> dict:
        return {"version": STATE_VERSION,
                "edges": {edge: {"rates_bps": list(link.window.rates), "rtts_s": list(link.window.rtts),
                                 "updated": link.updated} for edge, link in self._edges.items()}}

    @classmethod
    def from_dict(cls, data: Mapping, clock: Callable[[], float] = time.time, max_age_s: float = MAX_AGE_S) -> LinkBook:
        """Raises ValueError when ``data`` is not a link state this version wrote; samples out of
        bounds are dropped, and so is an edge last measured over ``max_age_s`` ago (or at an
        unknown time)."""
        if not isinstance(data, Mapping) or data.get("version") != STATE_VERSION \
                or not isinstance(data.get("edges"), Mapping):
            raise ValueError(f"not a version-{STATE_VERSION} link state")
        book = cls(clock=clock)
        now = clock()
        for edge, windows in data["edges"].items():
            if not isinstance(edge, str) or not isinstance(windows, Mapping):
                raise ValueError(f"bad entry for edge {edge!r}")
            rates, rtts = windows.get("rates_bps", []), windows.get("rtts_s", [])
            if not isinstance(rates, list) or not isinstance(rtts, list) \
                    or not all(is_number(v) for v in (*rates, *rtts)):
                raise ValueError(f"samples of edge {edge!r} are not lists of numbers")
            updated = windows.get("updated")
            if not is_number(updated) or not 0 <= now - updated <= max_age_s:
                continue  # measured too long ago (or in the future, or when is unknown)
            book._edges.put(edge, _EdgeLink(LinkWindow(rates[-WINDOW:], rtts[-WINDOW:]), float(updated)))
        return book


def state_path(env: Mapping[str, str] = os.environ) -> Path:
    """``$TANDEM_LINK_STATE``, else ``$XDG_CACHE_HOME/tandem/links.json`` (~/.cache by default)."""
    if env.get(STATE_ENV):
        return Path(env[STATE_ENV]).expanduser()
    cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tandem" / "links.json"


def load_book(path: Path) -> tuple[LinkBook, str | None]:
    """The persisted book, or an empty one; the second item is a warning when the file was there
    but unusable (it is then ignored and overwritten by the next save)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return LinkBook(), None
    except OSError as exc:
        return LinkBook(), f"link state {path} unreadable ({exc.strerror}); starting without a link estimate"
    try:
        return LinkBook.from_dict(json.loads(text)), None
    except (ValueError, TypeError, AttributeError) as exc:  # json.JSONDecodeError is a ValueError
        return LinkBook(), f"link state {path} is corrupt ({exc}); ignoring it"


def save_book(book: LinkBook, path: Path) -> None:
    """Atomically (a temporary file renamed over ``path``): a crash never leaves half a file.
    Raises OSError when the directory cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".links-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(book.to_dict(), out)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class LinkState:
    """One CLI run's link (the CLI makes one image per process): the estimate read before the
    plan, what the Plan request carried, this run's handoff measured and, when the CLI talks to an
    edge itself, the book kept in ``path`` across runs. With --ue the device service measures and
    keeps its own link; ``remote`` is its estimate (GetLinkEstimate)."""

    path: Path | None  # None: nothing kept
    book: LinkBook
    edge: str | None  # the edge the user named (None: a scheduler's plan picks one)
    override_bps: float | None  # --link-mbps
    remote: LinkEstimate | None = None
    sent: dict | None = None  # the link the Plan request carried
    sample: LinkSample | None = None  # this run's measurement

    @classmethod
    def kept(cls, path: Path, edge: str | None, override_bps: float | None) -> tuple[LinkState, str | None]:
        """The state kept in ``path``, and a warning when the file was there but unusable."""
        book, warning = load_book(path)
        return cls(path, book, edge, override_bps), warning

    @classmethod
    def unkept(cls, edge: str | None, override_bps: float | None, remote: LinkEstimate | None = None) -> LinkState:
        return cls(None, LinkBook(), edge, override_bps, remote)

    def for_plan(self) -> tuple[float, float]:
        """(bandwidth b/s, RTT s) for the Plan request; 0 = unknown (the scheduler's own then)."""
        estimate = self.remote or (self.book.estimate(self.edge) if self.path is not None else LinkEstimate())
        source = "override" if self.override_bps else "measured" if estimate.known else "unknown"
        bandwidth = self.override_bps or estimate.bandwidth_bps
        self.sent = {"bandwidth_bps": bandwidth, "rtt_s": estimate.rtt_s, "source": source,
                     "rate_samples": estimate.rate_samples, "rtt_samples": estimate.rtt_samples,
                     "text": _describe(bandwidth, estimate, source)}
        return bandwidth, estimate.rtt_s

    def record(self, sample: LinkSample, edge: str | None = None) -> None:
        """This run's measurement, kept in the book for ``edge`` when the state is kept."""
        self.sample = sample
        if self.path is not None and edge:
            self.book.record(edge, sample)

    def recorder(self, edge: str | None) -> Callable[[LinkSample], None]:
        return partial(self.record, edge=edge)

    def save(self) -> None:
        """Writes the book back when this run measured something; raises OSError."""
        if self.path is not None and self.sample is not None:
            save_book(self.book, self.path)

    def report(self) -> dict | None:
        if self.sent is None and self.sample is None:
            return None
        s = self.sample
        measured = None if s is None else {"handoff_bytes": s.nbytes, "transfer_s": round(s.transfer_s, 6),
                                           "rtt_s": round(s.rtt_s, 6), "rate_bps": s.rate_bps}
        return {"sent": self.sent, "measured": measured, "state": str(self.path) if self.path else None}


def _describe(bandwidth_bps: float, estimate: LinkEstimate, source: str) -> str:
    if source == "override":
        rtt = f", rtt {estimate.rtt_s * 1e3:.0f} ms (measured)" if estimate.rtt_s > 0 else ""
        return f"{bandwidth_bps / 1e6:.3g} Mbit/s (--link-mbps){rtt}"
    return estimate.describe() if source == "measured" else "unknown (no measured handoffs yet): the scheduler's own"
