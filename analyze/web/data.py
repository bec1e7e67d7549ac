"""What the web pages read: runs, SAEs, analyses and features, with small caches.

Everything is looked up by *name*: a name from a URL is checked with ``check_name`` first, so
no URL can name a file outside the lake (``..``, ``%2e%2e``, slashes and long strings all fail
the check and become a 404). Manifests are the source of truth (read directly, cached a few
seconds); per-feature scalars of an analysis (density, max, mean) are loaded once into NumPy
arrays so that the feature list pages and filters server-side without touching the store
again; one feature row is read with a point lookup (Lance ``take`` by row, MongoDB index).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from saelake.lake import Lake, UserError
from saelake.lake.storage import check_name

SCALAR_COLUMNS = ("feature", "count", "density", "max_act", "mean_act")


class NotFound(Exception):
    """-> a 404 page that says what was not found."""


class Loading(Exception):
    """The data is being loaded in the background: the page says so and refreshes."""


class StoreDown(Exception):
    """-> a 503 page: the feature store cannot be reached (the server keeps running)."""


def shown(name: str, limit: int = 80) -> str:
    """A user-supplied id, safe to echo in a page (short)."""
    name = str(name)
    return name if len(name) <= limit else name[:limit] + f"… ({len(name)} characters)"


def valid_name(name: str, what: str) -> str:
    try:
        return check_name(name, what)
    except UserError:
        raise NotFound(f"no {what} {shown(name)!r}") from None


@dataclass
class Scalars:
    """Per-feature scalars of one analysis, as arrays indexed by position (sorted by feature)."""
    feature: np.ndarray
    count: np.ndarray
    density: np.ndarray
    max_act: np.ndarray
    mean_act: np.ndarray

    @classmethod
    def from_columns(cls, cols: dict) -> "Scalars":
        arrays = {k: np.asarray(cols[k]) for k in SCALAR_COLUMNS}
        order = np.argsort(arrays["feature"], kind="stable")
        return cls(**{k: v[order] for k, v in arrays.items()})

    def __len__(self) -> int:
        return len(self.feature)

    def select(self, dmin=None, dmax=None, amin=None, amax=None, sort="feature", desc=False) -> np.ndarray:
        """Positions of the features that pass the filters, in the requested order."""
        keep = np.ones(len(self), bool)
        if dmin is not None:
            keep &= self.density >= dmin
        if dmax is not None:
            keep &= self.density <= dmax
        if amin is not None:
            keep &= self.max_act >= amin
        if amax is not None:
            keep &= self.max_act <= amax
        idx = np.flatnonzero(keep)
        if sort != "feature":
            key = getattr(self, sort)[idx]
            idx = idx[np.argsort(-key if desc else key, kind="stable")]
        elif desc:
            idx = idx[::-1]
        return idx

    def subset(self, features: list[int]) -> "Scalars":
        pos = np.searchsorted(self.feature, np.asarray(features))
        pos = pos[(pos < len(self)) & (self.feature[np.minimum(pos, len(self) - 1)] == np.asarray(features))]
        return Scalars(**{k: getattr(self, k)[pos] for k in SCALAR_COLUMNS})

    def row(self, pos: int) -> dict:
        return {k: getattr(self, k)[pos].item() for k in SCALAR_COLUMNS}

    def density_histogram(self, step: float = 0.25) -> tuple[list[float], list[int], int]:
        """(log10-density bin edges, counts, dead features). Dead = no activation in the analysis."""
        alive = self.density[self.count > 0]
        dead = int((self.count == 0).sum())
        if len(alive) == 0:
            return [], [], dead
        lo = np.floor(np.log10(alive.min()) / step) * step
        hi = max(lo + step, np.ceil(np.log10(alive.max()) / step) * step)
        if np.log10(alive.max()) >= hi:
            hi += step
        edges = np.arange(lo, hi + step / 2, step)
        counts, _ = np.histogram(np.log10(alive), bins=edges)
        return edges.round(4).tolist(), counts.tolist(), dead


class LakeData:
    """The lake, its feature stores, and caches; shared by all request threads."""

    def __init__(self, lake_uri: str, store: str | None = None, model: str | None = None, ttl: float = 3.0,
                 store_timeout_s: float = 2.0):
        self.lake = Lake(lake_uri)
        self.store_uri = store if store and store != "embedded" else None
        if self.store_uri and not self.store_uri.startswith(("mongodb://", "mongodb+srv://")):
            raise UserError(f"unknown --store {store!r}: use mongodb://HOST:PORT/DB or leave it out (embedded)")
        self.model_spec = model
        self.ttl, self.store_timeout_s = ttl, store_timeout_s
        self._lock = threading.RLock()
        self._cache: dict = {}
        self._stores: dict = {}
        self._store_errors: dict = {}  # uri -> (time, message): do not wait on a dead server every request
        self._scalars: dict = {}
        self._datasets: dict = {}
        self._loading: dict = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="saelake-web-load")
        self.scalars_wait_s = 5.0

    # -- small TTL cache -------------------------------------------------------------------------
    def cached(self, key, fn, ttl: float | None = None):
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit and now - hit[0] < (self.ttl if ttl is None else ttl):
                return hit[1]
        value = fn()
        with self._lock:
            self._cache[key] = (now, value)
        return value

    # -- runs ----------------------------------------------------------------------------------
    def runs(self) -> list[dict]:
        def load():
            out = []
            for n in self.lake.run_names():
                try:
                    out.append(self.lake.manifest(n).to_json())
                except UserError:
                    continue
            return out
        return self.cached("runs", load)

    def run(self, name: str) -> dict:
        valid_name(name, "run")
        for m in self.runs():
            if m["name"] == name:
                return m
        raise NotFound(f"no run {shown(name)!r} in this lake")

    def size_on_disk(self, *parts: str) -> int | None:
        def load():
            try:
                return int(self.lake.storage.fs.du(self.lake.storage.uri(*parts), total=True))
            except Exception:
                return None
        return self.cached(("du",) + parts, load, ttl=60)

    # -- SAEs ----------------------------------------------------------------------------------
    def saes(self) -> list[dict]:
        def load():
            st = self.lake.storage
            out = []
            for n in st.listdir("saes"):
                try:
                    cfg = st.read_json("saes", n, "config.json")
                except UserError:
                    continue
                if cfg:
                    out.append({**cfg, "name": cfg.get("name") or n})
            return out
        return self.cached("saes", load)

    def sae(self, name: str) -> dict:
        valid_name(name, "SAE")
        for c in self.saes():
            if c["name"] == name:
                return c
        raise NotFound(f"no SAE {shown(name)!r} in this lake")

    def metrics(self, name: str) -> list[dict]:
        valid_name(name, "SAE")
        def load():
            m = self.lake.storage.read_json("saes", name, "metrics.json")
            return m if isinstance(m, list) else (m or {}).get("rows", [])
        return self.cached(("metrics", name), load)

    # -- analyses ------------------------------------------------------------------------------
    def analyses(self) -> list[dict]:
        """Analyses the lake knows (``analyses/<name>/analysis.json``), plus those of ``--store``."""
        def load():
            st = self.lake.storage
            out = {}
            for n in st.listdir("analyses"):
                try:
                    rec = st.read_json("analyses", n, "analysis.json")
                except UserError:
                    continue
                if rec and rec.get("name"):
                    out[rec["name"]] = rec
            if self.store_uri:
                try:
                    store = self.store(self.store_uri)
                    for rec in store.db.analyses.find({}, {"_id": 0}):
                        out.setdefault(rec["name"], rec)
                except StoreDown:
                    pass
                except Exception:
                    self._forget_store(self.store_uri, "listing analyses failed")
            return sorted(out.values(), key=lambda r: (r.get("created") or "", r["name"]), reverse=True)
        return self.cached("analyses", load)

    def analyses_of(self, sae: str) -> list[dict]:
        return [r for r in self.analyses() if r.get("sae") == sae]

    def analysis_for(self, sae: str, name: str | None) -> dict | None:
        """The named analysis of ``sae`` (404 if absent), or the default one (None if it has none).
        Default: the newest in ``--store`` when one is given, else the newest."""
        recs = self.analyses_of(sae)
        if name:
            valid_name(name, "analysis")
            for r in recs:
                if r["name"] == name:
                    return r
            raise NotFound(f"no analysis {shown(name)!r} of SAE {sae!r}")
        if self.store_uri:
            mine = [r for r in recs if self._store_uri_of(r) == self.store_uri]
            if mine:
                return mine[0]
        return recs[0] if recs else None

    # -- stores ----------------------------------------------------------------------------------
    def _store_uri_of(self, rec: dict) -> str | None:
        where = rec.get("store") or "embedded"
        if where == "embedded":
            return None
        # the record names the URI without its password: prefer --store when it is a MongoDB store
        return self.store_uri or where

    def store(self, uri: str):
        from saelake.analyze.stores import MongoStore

        with self._lock:
            if uri in self._stores:
                return self._stores[uri]
            err = self._store_errors.get(uri)
            if err and time.monotonic() - err[0] < 5:
                raise StoreDown(err[1])
        try:
            st = MongoStore(uri, timeout_s=self.store_timeout_s)
        except UserError as e:
            msg = f"feature store unreachable: {e}"
            with self._lock:
                self._store_errors[uri] = (time.monotonic(), msg)
            raise StoreDown(msg) from None
        with self._lock:
            self._stores[uri] = st
        return st

    def _forget_store(self, uri: str, what: str) -> str:
        from saelake.analyze.stores import redact

        with self._lock:
            st = self._stores.pop(uri, None)
            msg = f"feature store unreachable: MongoDB at {redact(uri)} ({what})"
            self._store_errors[uri] = (time.monotonic(), msg)
        if st is not None:
            try:
                st.close()
            except Exception:
                pass
        return msg

    def _mongo(self, rec: dict, fn):
        from pymongo.errors import PyMongoError

        uri = self._store_uri_of(rec)
        store = self.store(uri)
        try:
            return fn(store)
        except PyMongoError as e:
            raise StoreDown(self._forget_store(uri, type(e).__name__)) from None

    def _dataset(self, rec: dict):
        key = (rec["name"], rec.get("features_table"))
        with self._lock:
            ds = self._datasets.get(key)
        if ds is None:
            from saelake.analyze.stores import EmbeddedStore
            try:
                ds = EmbeddedStore(self.lake).dataset(rec["name"])
            except UserError as e:
                raise NotFound(str(e)) from None
            except Exception as e:
                raise StoreDown(f"cannot open the feature table of analysis {rec['name']!r}: "
                                f"{str(e).splitlines()[0][:200]}") from None
            with self._lock:
                self._datasets[key] = ds
        return ds

    def feature(self, rec: dict, index: int) -> dict:
        n = int(rec.get("n_features") or 0)
        if not 0 <= index < n:
            raise NotFound(f"no feature {index} in analysis {rec['name']!r} of SAE {rec['sae']!r} "
                           f"(features 0..{n - 1})")
        if self._store_uri_of(rec) is None:
            ds = self._dataset(rec)
            row = None
            if index < ds.count_rows():  # features are written in order: row i is feature i
                row = ds.take([index]).to_pylist()[0]
            if row is None or row["feature"] != index:
                rows = ds.to_table(filter=f"feature = {int(index)}").to_pylist()
                row = rows[0] if rows else None
        else:
            row = self._mongo(rec, lambda st: st.feature(rec["name"], index))
        if row is None:
            raise NotFound(f"feature {index} is missing from analysis {rec['name']!r}")
        return row

    def scalars(self, rec: dict, wait_s: float | None = None) -> Scalars:
        """The analysis's per-feature scalars (cached). A MongoDB store loads them in a background
        thread: past ``wait_s`` this raises ``Loading`` (the page says so and refreshes) instead of
        holding the request while a slow server streams every feature document."""
        key = (rec["name"], rec.get("store"), rec.get("features_table"), rec.get("created"))
        with self._lock:
            hit = self._scalars.get(key)
        if hit is not None:
            return hit
        if self._store_uri_of(rec) is None:
            t = self._dataset(rec).to_table(columns=list(SCALAR_COLUMNS))
            sc = Scalars.from_columns({k: t.column(k).to_numpy() for k in SCALAR_COLUMNS})
            with self._lock:
                self._scalars[key] = sc
            return sc

        def load() -> Scalars:
            rows = self._mongo(rec, lambda st: st.scalars(rec["name"]))
            sc = Scalars.from_columns({k: np.array([r[k] for r in rows]) for k in SCALAR_COLUMNS})
            with self._lock:
                self._scalars[key] = sc
            return sc

        with self._lock:
            fut = self._loading.get(key)
            if fut is None:
                fut = self._pool.submit(load)
                self._loading[key] = fut
        try:
            return fut.result(timeout=self.scalars_wait_s if wait_s is None else wait_s)
        except FutureTimeout:
            raise Loading(f"loading the density, max and mean of {int(rec.get('n_features') or 0):,} features "
                          f"of analysis {rec['name']!r} from {rec.get('store')}: this page refreshes by itself") \
                from None
        except BaseException:
            with self._lock:
                if self._loading.get(key) is fut:
                    del self._loading[key]  # let the next request retry
            raise
