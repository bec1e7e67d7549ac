"""Embedded feature tables as SQL relations for ``lake query``: ``features__<analysis>``.

``relations(lake, sql)`` returns {relation name: Arrow reader} for every ``features__<name>``
the SQL mentions (analysis names with characters other than letters, digits and ``_`` are
spelled with ``_``). Only the columns the SQL names are read (all of them for ``*``), so
``select feature, density from features__a order by density desc`` never touches samples.
"""

from __future__ import annotations

import re

from saelake.lake import UserError

from .stores import EmbeddedStore
from .table import SCHEMA


def relations(lake, sql: str) -> dict:
    store = EmbeddedStore(lake)
    names = {re.sub(r"[^A-Za-z0-9_]", "_", n): n for n in lake.storage.listdir("analyses") if store.exists(n)}
    out = {}
    for key in set(re.findall(r"\bfeatures__([A-Za-z0-9_]+)\b", sql)):
        name = names.get(key)
        if name is None:
            raise UserError(f"no analysis {key!r} for features__{key}: see `lake ls`")
        rec = store.record(name)
        if not rec.features_table:
            raise UserError(f"analysis {name!r} is stored in {rec.store}, not in the lake: query it there")
        cols = [f.name for f in SCHEMA if re.search(rf"\b{f.name}\b", sql)]
        if "*" in sql or not cols:
            cols = SCHEMA.names
        out[f"features__{key}"] = store.dataset(name, rec).scanner(columns=cols).to_reader()
    return out
