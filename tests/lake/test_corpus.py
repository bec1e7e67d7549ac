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
        assert (c.tokens[1:] == stream[p:p + T - 1]).all()
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


@pytest.mark.parametrize("spec,column,match", [
    ("/no/such/file.jsonl", "text", "does not exist"),
    ("builtin:nope", "text", "unknown built-in corpus"),
    ("JSONL", "missing_col", "not in"),
])
def test_bad_corpus_is_a_clear_error(tmp_path, spec, column, match):
    if spec == "JSONL":
        (tmp_path / "c.jsonl").write_text(json.dumps({"body": "hello"}))
        spec = str(tmp_path / "c.jsonl")
    with pytest.raises(UserError, match=match):
        list(documents(spec, column))
