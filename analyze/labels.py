"""Short labels of features and search over them.

A feature's short label is its explanation when it has one, else its tokens: the tokens it
fires on most (the peak token of each top example, most frequent first) and the tokens it
promotes most. ``token_summaries`` reads those from the feature store in one pass: SQL over the
embedded Lance table (DuckDB list lambdas pick each top example's peak token, so no Python
loop over samples), a projection of the ``features`` collection in MongoDB.

``search`` matches a text, case-insensitively, against explanations and notes (answered by the
explanation store: SQL / a MongoDB regex) and against those tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

N_TOKENS = 3  # tokens of each kind in a label

PEAK_SQL = """
select feature,
  list_transform(list_filter(samples, lambda s: s.kind = 'top' and len(s.acts) > 0),
                 lambda s: s.strs[s.positions[list_position(s.acts, list_max(s.acts))] + 1]) as act,
  pos_strs[1:{n}] as promoted
from f
"""


@dataclass(frozen=True)
class TokenSummary:
    act: tuple[str, ...]  # tokens it fires on most, most frequent first
    promoted: tuple[str, ...]  # tokens it promotes most

    @classmethod
    def of(cls, peaks: list[str] | None, promoted: list[str] | None) -> TokenSummary:
        counts = Counter(p for p in peaks or [] if p is not None)
        act = tuple(t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:N_TOKENS])  # stable: first seen
        return cls(act, tuple((promoted or [])[:N_TOKENS]))

    def text(self) -> str:
        """The label: ``fires on "a", "b" · promotes "c", "d"``."""
        parts = []
        if self.act:
            parts.append("fires on " + ", ".join(shown_token(t) for t in self.act))
        if self.promoted:
            parts.append("promotes " + ", ".join(shown_token(t) for t in self.promoted))
        return " · ".join(parts)

    def matches(self, needle: str) -> bool:
        n = needle.lower()
        return any(n in t.lower() for t in self.act + self.promoted)


def shown_token(s: str) -> str:
    """A token in a label: quoted when spaces or invisible characters would otherwise hide."""
    return repr(s) if not s.strip() or s != s.strip() or not s.isprintable() else s


def feature_summary(row: dict) -> TokenSummary:
    """The summary of one feature row (as a store returns it)."""
    peaks = []
    for s in row.get("samples") or []:
        if s["kind"] == "top" and s["acts"]:
            j = max(range(len(s["acts"])), key=s["acts"].__getitem__)
            peaks.append(s["strs"][s["positions"][j]])
    return TokenSummary.of(peaks, row.get("pos_strs"))


def token_summaries(lake, rec, mongo=None) -> dict[int, TokenSummary]:
    """Every feature's TokenSummary, in one pass over the analysis's feature store."""
    store = rec.store if hasattr(rec, "store") else rec.get("store")
    name = rec.name if hasattr(rec, "name") else rec["name"]
    if (store or "embedded") == "embedded":
        import duckdb

        from .stores import EmbeddedStore

        ds = EmbeddedStore(lake).dataset(name)
        con = duckdb.connect()
        try:
            con.execute("set enable_progress_bar = false")
            con.register("f", ds.scanner(columns=["feature", "samples", "pos_strs"]).to_reader())
            rows = con.execute(PEAK_SQL.format(n=N_TOKENS)).fetchall()
        finally:
            con.close()
        return {int(f): TokenSummary.of(act, prom) for f, act, prom in rows}
    if mongo is None:
        from .stores import MongoStore

        mongo = MongoStore(store)
    proj = {"_id": 0, "feature": 1, "pos_strs": 1, "samples": 1}  # not samples.strs: some servers drop it
    return {int(d["feature"]): feature_summary(d) for d in mongo.db.features.find({"analysis": name}, proj)}


def label(explanation: dict | None, summary: TokenSummary | None) -> tuple[str, str]:
    """(short label, where it comes from: explanation | note | tokens | none)."""
    if explanation:
        if explanation.get("explanation"):
            return explanation["explanation"], "explanation"
        if explanation.get("note"):
            return explanation["note"], "note"
    if summary is not None and (summary.act or summary.promoted):
        return summary.text(), "tokens"
    return "", "none"


def search(text: str, explained: set[int], summaries: dict[int, TokenSummary]) -> set[int]:
    """Features matching ``text``: ``explained`` (what the explanation store matched) plus those whose
    tokens match."""
    text = (text or "").strip()
    if not text:
        return set(summaries)
    return set(explained) | {f for f, s in summaries.items() if s.matches(text)}
