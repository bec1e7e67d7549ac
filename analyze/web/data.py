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
    def from_columns(cls, cols: dict) -> Scalars:
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

    def subset(self, features: list[int]) -> Scalars:
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

    def __init__(
        self,
        lake_uri: str,
        store: str | None = None,
        model: str | None = None,
        ttl: float = 3.0,
        store_timeout_s: float = 2.0,
    ):
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
        self._values: dict = {}
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
                raise StoreDown(
                    f"cannot open the feature table of analysis {rec['name']!r}: {str(e).splitlines()[0][:200]}"
                ) from None
            with self._lock:
                self._datasets[key] = ds
        return ds

    def feature(self, rec: dict, index: int) -> dict:
        n = int(rec.get("n_features") or 0)
        if not 0 <= index < n:
            raise NotFound(
                f"no feature {index} in analysis {rec['name']!r} of SAE {rec['sae']!r} (features 0..{n - 1})"
            )
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

    def _background(self, key, load, wait_s: float, loading_message: str):
        """``load()``'s value, cached under ``key``; computed in a background thread so that past
        ``wait_s`` this raises ``Loading`` (the page says so) instead of holding the request."""
        with self._lock:
            if key in self._values:
                return self._values[key]
            fut = self._loading.get(key)
            if fut is None:

                def run():
                    value = load()
                    with self._lock:
                        self._values[key] = value
                    return value

                fut = self._pool.submit(run)
                self._loading[key] = fut
        try:
            return fut.result(timeout=wait_s)
        except FutureTimeout:
            raise Loading(loading_message) from None
        except BaseException:
            with self._lock:
                if self._loading.get(key) is fut:
                    del self._loading[key]  # let the next request retry
            raise

    def scalars(self, rec: dict, wait_s: float | None = None) -> Scalars:
        """The analysis's per-feature scalars (cached). A MongoDB store loads them in a background
        thread: past ``wait_s`` this raises ``Loading`` (the page says so and refreshes) instead of
        holding the request while a slow server streams every feature document."""
        key = ("scalars", rec["name"], rec.get("store"), rec.get("features_table"), rec.get("created"))
        with self._lock:
            hit = self._values.get(key)
        if hit is not None:
            return hit
        if self._store_uri_of(rec) is None:
            t = self._dataset(rec).to_table(columns=list(SCALAR_COLUMNS))
            sc = Scalars.from_columns({k: t.column(k).to_numpy() for k in SCALAR_COLUMNS})
            with self._lock:
                self._values[key] = sc
            return sc

        def load() -> Scalars:
            rows = self._mongo(rec, lambda st: st.scalars(rec["name"]))
            return Scalars.from_columns({k: np.array([r[k] for r in rows]) for k in SCALAR_COLUMNS})

        return self._background(
            key,
            load,
            self.scalars_wait_s if wait_s is None else wait_s,
            f"loading the density, max and mean of {int(rec.get('n_features') or 0):,} features "
            f"of analysis {rec['name']!r} from {rec.get('store')}: this page refreshes by itself",
        )

    # -- labels: explanations, scores, notes, token summaries ------------------------------------
    def explanation_store(self, rec: dict):
        from saelake.analyze.explanations import EmbeddedExplanations, MongoExplanations

        uri = self._store_uri_of(rec)
        if uri is None:
            return EmbeddedExplanations(self.lake)
        with self._lock:
            hit = self._values.get(("explanation-store", uri))
        if hit is None:
            hit = self._mongo(rec, lambda st: MongoExplanations(st))  # creates its index once
            with self._lock:
                self._values[("explanation-store", uri)] = hit
        return hit

    def explanations(self, rec: dict) -> dict[int, dict]:
        """Every explanation / score / note row of the analysis (re-read when the store changes)."""
        key = ("explanations", rec["name"], rec.get("store"))

        def load():
            st = self.explanation_store(rec)
            version = self._mongo_or_call(rec, lambda: st.version(rec["name"]))
            with self._lock:
                hit = self._values.get(key)
            if hit is not None and hit[0] == version:
                return hit[1]
            rows = self._mongo_or_call(rec, lambda: st.rows(rec["name"]))
            with self._lock:
                self._values[key] = (version, rows)
            return rows

        return load()  # the version check is one small read: a page never shows rows older than a search

    def _mongo_or_call(self, rec: dict, fn):
        if self._store_uri_of(rec) is None:
            return fn()
        return self._mongo(rec, lambda _st: fn())

    def summaries(self, rec: dict, wait_s: float = 2.0) -> dict:
        """Every feature's TokenSummary (tokens it fires on and promotes), computed once per analysis
        in the background (``Loading`` past ``wait_s``)."""
        from saelake.analyze.labels import token_summaries

        key = ("summaries", rec["name"], rec.get("store"), rec.get("features_table"), rec.get("created"))
        mongo = self._store_uri_of(rec)
        if mongo is None:
            self._dataset(rec)  # a missing / damaged table is a NotFound / StoreDown now, not in the thread
        load = (
            (lambda: token_summaries(self.lake, rec))
            if mongo is None
            else (lambda: self._mongo(rec, lambda st: token_summaries(self.lake, rec, mongo=st)))
        )
        return self._background(
            key,
            load,
            wait_s,
            f"reading the tokens of {int(rec.get('n_features') or 0):,} features of analysis {rec['name']!r}",
        )

    def labels(self, rec: dict, features, wait_s: float = 2.0) -> dict[int, dict]:
        """{feature: {"label", "source", "detection", "fuzzing"}} for the given features. While the
        token summaries load, features without an explanation get an empty label."""
        from saelake.analyze.labels import label

        expl = self.explanations(rec)
        try:
            sums = self.summaries(rec, wait_s)
        except Loading:
            sums = {}
        out = {}
        for f in features:
            e = expl.get(int(f))
            text, source = label(e, sums.get(int(f)))
            s = sums.get(int(f))
            words = [(e or {}).get("explanation"), (e or {}).get("note"), *(s.act + s.promoted if s else ())]
            out[int(f)] = {
                "label": text,
                "source": source,
                "detection": (e or {}).get("detection"),
                "fuzzing": (e or {}).get("fuzzing"),
                "search": "\n".join(w for w in words if w).lower(),
            }
        return out

    def search(self, rec: dict, text: str, wait_s: float | None = None) -> set[int]:
        """Features whose explanation, note, top activating or top promoted tokens contain ``text``."""
        from saelake.analyze.labels import search

        st = self.explanation_store(rec)
        explained = self._mongo_or_call(rec, lambda: st.search(rec["name"], text))
        return search(text, explained, self.summaries(rec, self.scalars_wait_s if wait_s is None else wait_s))

    def set_note(self, rec: dict, feature: int, note: str | None) -> None:
        from saelake.analyze.explanations import check_text

        n = int(rec.get("n_features") or 0)
        if not 0 <= feature < n:
            raise NotFound(f"no feature {feature} in analysis {rec['name']!r} (features 0..{n - 1})")
        st = self.explanation_store(rec)
        change = {feature: {"note": check_text(note, "note")}}
        self._mongo_or_call(rec, lambda: st.update(rec["name"], rec["sae"], change))

    # -- per-token norms of sample contexts (to flag peaks on high-norm tokens) ---------------------
    def context_norms(self, rec: dict, context_ids: list[int]) -> tuple[dict[int, list[float]], float | None]:
        """({context id: the norm of each token at the analysis's hook}, the hook's median norm), read
        from the run's 2d table at the analysis's snapshot; ({}, None) for live analyses."""
        run, version, hook = rec.get("run"), rec.get("version"), rec.get("hook")
        if not run or not version or not context_ids:
            return {}, None
        try:
            m = self.run(run)
            col = (m.get("columns") or {}).get(hook)
            median = ((m.get("stats") or {}).get(hook) or {}).get("median_norm")
            lance_version = (m["versions"][int(version) - 1].get("tables") or {}).get("contexts")
        except (NotFound, IndexError, KeyError, TypeError):
            return {}, None
        if not col or not median or lance_version is None:
            return {}, None
        key = ("contexts", run, lance_version)
        with self._lock:
            ds = self._datasets.get(key)
        try:
            if ds is None:
                ds = self.lake.dataset(run, "contexts", version=lance_version)
                with self._lock:
                    self._datasets[key] = ds
            ids = sorted({int(c) for c in context_ids})
            n = ds.count_rows()
            rows = (
                ds.take([c for c in ids if c < n], columns=["context_id", f"{col}_norm"]).to_pylist()
                if all(c < n for c in ids)
                else []
            )
            got = {r["context_id"]: r[f"{col}_norm"] for r in rows}
            if set(got) != set(ids):  # context ids are not row numbers here: filter instead
                rows = ds.to_table(
                    columns=["context_id", f"{col}_norm"], filter=f"context_id IN ({','.join(map(str, ids))})"
                ).to_pylist()
                got = {r["context_id"]: r[f"{col}_norm"] for r in rows}
        except (UserError, OSError, ValueError):
            return {}, None
        return got, float(median)
