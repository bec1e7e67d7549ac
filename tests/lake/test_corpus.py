import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saelake.lake import UserError, documents, load_model, pack_contexts


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_model(tiny_model)


@pytest.fixture(scope="module")
def docs(tiny_corpus):
    return [d for d in open(tiny_corpus).read().split("\n\n") if d.strip()]


def test_contexts_start_with_bos_and_record_their_source(model, docs):
    T, bos = 16, model.bos_token_id
    ctxs = list(pack_contexts(docs, model.tokenizer, T, bos))
    assert len(ctxs) > 50
    doc_tokens = [model.tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    for c in ctxs:
        assert c.tokens.dtype == np.int32 and len(c.tokens) == T
        assert c.tokens[0] == bos and c.tokens[1] != bos  # never BOS BOS
        # the first content token is where the context says it is
        assert doc_tokens[c.doc_id][c.offset] == c.tokens[1]
    assert [c.context_id for c in ctxs] == list(range(len(ctxs)))
    # nothing lost: the stream (BOS-separated documents) is covered in order
    stream = np.concatenate([np.r_[bos, ids] for ids in doc_tokens if ids])[1:]
    p = 0
    for c in ctxs:
        if stream[p] == bos:  # a separator at a context start is skipped
            p += 1
        assert (c.tokens[1:] == stream[p : p + T - 1]).all()
        p += T - 1
    assert len(stream) - p < T  # only the final partial context is dropped


def test_packing_is_deterministic(model, docs):
    a = [c.tokens for c in pack_contexts(docs, model.tokenizer, 24, model.bos_token_id)]
    b = [c.tokens for c in pack_contexts(docs, model.tokenizer, 24, model.bos_token_id)]
    assert len(a) == len(b) and all((x == y).all() for x, y in zip(a, b))


def test_local_formats_give_the_same_documents(tmp_path, docs):
    docs = docs[:20]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet")
    import csv

    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["body"])
        w.writerows([[d] for d in docs])
    for name in ("c.jsonl", "c.parquet", "c.csv"):
        assert list(documents(str(tmp_path / name), "body")) == docs, name
    sub = tmp_path / "dir"
    sub.mkdir()
    (sub / "a.txt").write_text(docs[0])
    (sub / "b.txt").write_text(docs[1])
    assert list(documents(str(sub))) == [docs[0], docs[1]]  # one document per text file


def test_builtin_corpus_is_real_english_offline():
    it = documents("builtin")
    text = " ".join(next(it) for _ in range(20))
    assert len(text.split()) > 2000 and " the " in text
    assert next(documents("builtin:stdlib"))


def test_builtin_corpus_is_the_same_on_every_machine(tmp_path, monkeypatch):
    """The text ships with saelake: what the machine has installed (Debian's fortunes, the Python
    version, modules next to the standard library) does not change it; fortunes only by name."""
    import hashlib

    from saelake.lake import corpus

    def digest(spec):
        return hashlib.sha256("\x00".join(documents(spec)).encode()).hexdigest()

    docs = list(documents("builtin"))
    assert len(docs) == 1386 and sum(map(len, docs)) == 1_393_614
    assert docs == list(documents("builtin:pydoc")) + list(documents("builtin:stdlib"))
    before = digest("builtin")
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "art").write_text(
        "A quotation that is long enough to count as a fortune entry.\n%\nAnother one, "
        "also long enough to count as a fortune entry here.\n"
    )
    monkeypatch.setattr(corpus, "FORTUNES", str(fortunes))
    monkeypatch.setattr("sysconfig.get_paths", lambda: {"stdlib": str(tmp_path)})  # another Python
    assert digest("builtin") == before
    assert list(documents("builtin:fortunes")) == [
        "A quotation that is long enough to count as a fortune entry.",
        "Another one, also long enough to count as a fortune entry here.",
    ]
    monkeypatch.setattr(corpus, "FORTUNES", str(tmp_path / "none"))
    with pytest.raises(UserError, match="apt-get install fortunes"):
        list(documents("builtin:fortunes"))


def test_damaged_builtin_corpus_is_named(tmp_path, monkeypatch):
    from saelake.lake import corpus

    damaged = tmp_path / "builtin.jsonl.gz"
    data = bytearray(corpus.BUILTIN_FILE.read_bytes())
    damaged.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(corpus, "BUILTIN_FILE", damaged)
    with pytest.raises(UserError, match="missing or damaged"):
        list(documents("builtin"))
    import gzip

    damaged.write_bytes(gzip.compress(b'{"source": "pydoc", "text": "other"}\n'))
    with pytest.raises(UserError, match="not the one this saelake ships"):
        list(documents("builtin"))


@pytest.mark.parametrize(
    "spec,column,match",
    [
        ("/no/such/file.jsonl", "text", "does not exist"),
        ("builtin:nope", "text", "unknown built-in corpus"),
        ("JSONL", "missing_col", "not in"),
    ],
)
def test_bad_corpus_is_a_clear_error(tmp_path, spec, column, match):
    if spec == "JSONL":
        (tmp_path / "c.jsonl").write_text(json.dumps({"body": "hello"}))
        spec = str(tmp_path / "c.jsonl")
    with pytest.raises(UserError, match=match):
        list(documents(spec, column))
