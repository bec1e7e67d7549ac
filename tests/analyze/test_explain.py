"""Explanations and scores: the stores (Lance in the lake, MongoDB), `lake explain` with the local
explainer on the tiny model, `lake explain --import`, `lake score` against OpenAI-compatible
servers on 127.0.0.1 (an oracle and a yes-sayer: the numbers must come out as they should),
`lake features --search`, and bad input."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from saelake.analyze.excerpts import excerpt, marked_positions
from saelake.analyze.explanations import EmbeddedExplanations, MongoExplanations
from saelake.analyze.labels import token_summaries
from saelake.analyze.run import AnalyzeConfig, analyze
from saelake.analyze.score import balanced_accuracy, held_out
from saelake.analyze.stores import EmbeddedStore, MongoStore
from saelake.lake import Lake, UserError
from tests.analyze.conftest import cli, free_port
from tests.conftest import make_tiny_model


@pytest.fixture(scope="module")
def xlake(alake, tmp_path_factory, mongo_server) -> dict:
    """A copy of the analysis lake with SAE topk analysed twice: embedded (``ex``) and in MongoDB (``exm``)."""
    root = str(tmp_path_factory.mktemp("explain") / "lake")
    shutil.copytree(alake, root)
    kw = dict(lake=root, sae="topk", batch_size=16, top_k=6, per_interval=2, n_zero=4)
    analyze(AnalyzeConfig(**kw, name="ex"), progress=False)
    uri = mongo_server + "explain"
    analyze(AnalyzeConfig(**kw, name="exm", store=uri), progress=False)
    return {"lake": root, "uri": uri}


def alive(lake: str, analysis: str, n: int) -> list[int]:
    sc = EmbeddedStore(Lake(lake)).scalars(analysis)
    return [r["feature"] for r in sc if r["count"] > 0][:n]


def test_store_merges_fields_swaps_tables_and_answers_sql(xlake, tmp_path):
    root = str(tmp_path / "lake")
    shutil.copytree(xlake["lake"], root)
    lake = Lake(root)
    st = EmbeddedExplanations(lake)
    st.update("ex", "topk", {1: {"explanation": "commas", "explainer": "a"}, 2: {"note": "odd one"}})
    first = st.record("ex")
    st.update("ex", "topk", {1: {"detection": 0.75, "fuzzing": 0.5}, 2: {"explanation": "brackets"}})
    rows = st.rows("ex")
    assert rows[1]["explanation"] == "commas" and rows[1]["detection"] == 0.75  # scoring kept the explanation
    assert rows[2]["note"] == "odd one" and rows[2]["explanation"] == "brackets"  # explaining kept the note
    rec = st.record("ex")
    assert rec.table != first.table and rec.rows == 2
    tables = [n for n in lake.storage.listdir("analyses", "ex") if n.startswith("explanations-")]
    assert tables == [rec.table]  # the old table is gone
    assert rec.checksums and all(k.startswith(f"{rec.table}/data/") for k in rec.checksums)
    assert st.search("ex", "BRACK") == {2} and st.search("ex", "odd") == {2} and st.search("ex", "%") == set()
    cols, got = lake.query("select feature, explanation, note, detection from explanations__ex order by feature")
    assert got == [(1, "commas", None, 0.75), (2, "brackets", "odd one", None)]
    with pytest.raises(UserError, match="no analysis"):
        st.update("nope", "topk", {1: {"note": "x"}})
    with pytest.raises(UserError, match="unknown explanation field"):
        st.update("ex", "topk", {1: {"colour": "red"}})


def test_mongo_store_same_semantics(xlake):
    m = MongoExplanations(MongoStore(xlake["uri"]))
    m.update("exm", "topk", {3: {"explanation": "Numbers in lists", "explainer": "a"}, 4: {"note": "x"}})
    m.update("exm", "topk", {3: {"note": "checked"}})
    rows = m.rows("exm", [3, 4, 5])
    assert set(rows) == {3, 4} and rows[3]["explanation"] == "Numbers in lists" and rows[3]["note"] == "checked"
    assert m.search("exm", "numbers IN") == {3} and m.search("exm", "(") == set()  # text, not a regex
    assert m.db.explanations.count_documents({"analysis": "exm"}) == 2


@pytest.fixture(scope="module")
def chat_tiny(tmp_path_factory) -> str:
    """The tiny test model with room for a prompt (1,024 positions): random weights, real generation."""
    return str(make_tiny_model(tmp_path_factory.mktemp("chat") / "tiny-1k", n_ctx=1024))


def test_local_explainer_on_the_tiny_model(xlake, chat_tiny, tmp_path):
    tiny_model = chat_tiny
    root = str(tmp_path / "lake")
    shutil.copytree(xlake["lake"], root)
    feats = alive(root, "ex", 3)
    code, out, err = cli(
        "explain",
        "--lake",
        root,
        "topk",
        "--analysis",
        "ex",
        "--features",
        ",".join(map(str, feats)),
        "--model",
        tiny_model,
        "--max-tokens",
        "8",
        "--quiet",
    )
    assert code == 0, err
    assert f"explained {len(feats)} features of analysis ex with local" in out and "s per feature" in out
    rows = EmbeddedExplanations(Lake(root)).rows("ex")
    store = EmbeddedStore(Lake(root))
    for f in feats:
        r, row = rows[f], store.feature("ex", f)
        assert r["explainer"] == "local" and r["explainer_model"] == tiny_model and len(r["prompt_sha256"]) == 64
        assert r["explanation"] is None or isinstance(r["explanation"], str)  # a random model: structure only
        ctx = {(s["context_id"], s["kind"]) for s in row["samples"] if s["acts"]}
        assert r["examples"] and set(zip(r["examples"], r["example_kinds"])) <= ctx
        assert len(set(r["examples"])) == len(r["examples"])  # an interval sample that is a top one is not repeated
        assert r["promoted"] == row["pos_strs"][:10]
    # already explained: skipped; --overwrite redoes them
    code, out, _ = cli(
        "explain",
        "--lake",
        root,
        "topk",
        "--analysis",
        "ex",
        "--features",
        str(feats[0]),
        "--model",
        tiny_model,
        "--max-tokens",
        "4",
        "--quiet",
    )
    assert "explained 0 features" in out and "1 already explained" in out


class _Chat(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions endpoint answering with ``self.server.answer(prompt)``."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append((self.path, self.headers.get("Authorization"), body))
        if self.server.key and self.headers.get("Authorization") != f"Bearer {self.server.key}":
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"error": "bad key"}')
            return
        if getattr(self.server, "respond", None):  # the whole answer (status, JSON object) from the test
            status, obj = self.server.respond(body)
        else:
            text = self.server.answer(body["messages"][-1]["content"])
            status, obj = 200, {"choices": [{"message": {"role": "assistant", "content": text}}]}
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def chat_server():
    servers = []

    def start(answer, key=None):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Chat)
        srv.answer, srv.key, srv.seen = answer, key, []
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_scores_from_an_oracle_and_a_yes_sayer_server(xlake, tmp_path, chat_server, monkeypatch):
    root = str(tmp_path / "lake")
    shutil.copytree(xlake["lake"], root)
    lake = Lake(root)
    rec = lake.analysis_record("ex")
    skip = set(rec.excluded_token_ids)
    feats = alive(root, "ex", 2)
    (tmp_path / "e.json").write_text(json.dumps({str(f): f"feature {f} things" for f in feats}))
    code, out, err = cli("explain", "--lake", root, "topk", "--analysis", "ex", "--import", str(tmp_path / "e.json"))
    assert code == 0 and f"imported {len(feats)} explanations" in out, err
    # the oracle knows each feature's held-out activating excerpts and their true marks
    truth = {}
    for f in feats:
        row = EmbeddedStore(lake).feature("ex", f)
        pos, neg = held_out(row, set(), 10)
        assert pos and neg
        truth[f] = ({excerpt(s, skip) for s in pos}, {excerpt(s, skip, marked_positions(s)) for s in pos})

    def oracle(prompt: str) -> str:
        head, rest = prompt.split("\n\nText: ", 1)
        text, question = rest.rsplit("\n\n", 1)
        detect, marks = truth[int(head.split("feature ")[1].split()[0])]
        return "Yes" if text in (marks if "marked tokens fit" in question else detect) else "No"

    monkeypatch.setenv("TEST_SCORER_KEY", "s3cret")
    srv, url = chat_server(oracle, key="s3cret")
    code, out, err = cli(
        "score",
        "--lake",
        root,
        "topk",
        "--analysis",
        "ex",
        "--scorer",
        url,
        "--model",
        "judge",
        "--api-key-env",
        "TEST_SCORER_KEY",
        "--quiet",
    )
    assert code == 0, err
    assert "mean detection 1.000, mean fuzzing 1.000" in out
    path, auth, body = srv.seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer s3cret" and body["model"] == "judge"
    rows = EmbeddedExplanations(lake).rows("ex")
    assert all(rows[f]["detection"] == 1.0 and rows[f]["fuzzing"] == 1.0 for f in feats)
    assert rows[feats[0]]["scorer"] == url and "s3cret" not in json.dumps(rows[feats[0]])  # the key is not stored
    assert "s3cret" not in "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.json"))
    # a server that always says yes scores 0.5 (balanced accuracy); --overwrite rescores
    _, url2 = chat_server(lambda p: "Yes.")
    code, out, err = cli(
        "score", "--lake", root, "topk", "--analysis", "ex", "--scorer", url2, "--overwrite", "--quiet"
    )
    assert code == 0 and "mean detection 0.500, mean fuzzing 0.500" in out, err
    # the list sorts by score; the feature page shows it
    code, out, _ = cli(
        "features",
        "--lake",
        root,
        "topk",
        "--analysis",
        "ex",
        "--sort",
        "detection",
        "--desc",
        "--limit",
        "2",
        "--json",
    )
    got = [json.loads(ln) for ln in out.splitlines()]
    assert [g["feature"] for g in got] == feats and all(g["detection"] == 0.5 for g in got)
    assert got[0]["label"] == f"feature {feats[0]} things" and got[0]["source"] == "explanation"


def test_server_yes_no_from_logprobs_or_the_answer(chat_server):
    from saelake.analyze.llm import OpenAIChat

    msg = [{"role": "user", "content": "q"}]
    tops = [{"token": " No", "logprob": -0.2}, {"token": "Yes", "logprob": -1.5}, {"token": "The", "logprob": -3.0}]
    srv, url = chat_server(None)
    srv.respond = lambda body: (
        200,
        {"choices": [{"message": {"content": "Yes, it does"}, "logprobs": {"content": [{"top_logprobs": tops}]}}]},
    )
    assert OpenAIChat(url, None, None, 10).yes_no(msg) is False  # the first token's log-probabilities decide
    assert srv.seen[0][2]["logprobs"] is True and srv.seen[0][2]["top_logprobs"] == 20
    # a server that refuses logprobs: asked once, then never again; the answer's first yes/no counts
    srv.respond = lambda body: (
        (400, {"error": "no logprobs"})
        if "logprobs" in body
        else (200, {"choices": [{"message": {"content": "I think no."}}]})
    )
    chat, n = OpenAIChat(url, None, None, 10), len(srv.seen)
    assert chat.yes_no(msg) is False and chat.yes_no(msg) is False
    assert [("logprobs" in b) for _, _, b in srv.seen[n:]] == [True, False, False]
    srv.respond = lambda body: (200, {"choices": [{"message": {"content": "Maybe."}}]})
    assert OpenAIChat(url, None, None, 10).yes_no(msg) is None  # counted as wrong by the scores
    srv.respond = lambda body: (500, {"error": "boom"})
    with pytest.raises(UserError, match="HTTP 500"):
        OpenAIChat(url, None, None, 10).yes_no(msg)


def test_balanced_accuracy():
    assert balanced_accuracy([True, True, None], [False]) == pytest.approx(0.5 * (2 / 3 + 1))
    assert balanced_accuracy([True], []) is None and balanced_accuracy([True] * 3, [True] * 9) == 0.5


@pytest.mark.parametrize("analysis", ["ex", "exm"])
def test_features_search_cli(xlake, tmp_path, analysis):
    root = str(tmp_path / "lake")
    shutil.copytree(xlake["lake"], root)
    lake = Lake(root)
    (tmp_path / "e.json").write_text(json.dumps([{"feature": 5, "explanation": "Quokka detector", "note": "ok"}]))
    store = ["--store", xlake["uri"]] if analysis == "exm" else []
    code, out, err = cli(
        "explain", "--lake", root, *store, "topk", "--analysis", analysis, "--import", str(tmp_path / "e.json")
    )
    assert code == 0, err
    code, out, err = cli(
        "features", "--lake", root, *store, "topk", "--analysis", analysis, "--search", "quokka", "--json"
    )
    assert code == 0, err
    assert [json.loads(ln)["feature"] for ln in out.splitlines()] == [5]
    code, out, err = cli("feature", "--lake", root, *store, "topk", "5", "--analysis", analysis)
    assert code == 0 and "explanation  Quokka detector" in out and "note         ok" in out, err
    assert "  neighbours\n" in out  # one per line, each with its label
    sums = token_summaries(
        lake,
        lake.analysis_record(analysis) if analysis == "ex" else MongoStore(xlake["uri"]).record(analysis),
        mongo=MongoStore(xlake["uri"]) if analysis == "exm" else None,
    )
    token = next(s.act[0].strip() for s in sums.values() if s.act and len(s.act[0].strip()) >= 2)
    code, out, _ = cli("features", "--lake", root, *store, "topk", "--analysis", analysis, "--search", token, "--json")
    got = {json.loads(ln)["feature"] for ln in out.splitlines()}
    assert got and got == {f for f, s in sums.items() if s.matches(token)} | (
        {5} if token.lower() in "quokka detector ok" else set()
    )


def test_bad_input_one_line_exit_2_nothing_written(xlake, tmp_path, monkeypatch):
    root = str(tmp_path / "lake")
    shutil.copytree(xlake["lake"], root)
    L = ["--lake", root, "topk", "--analysis", "ex", "--quiet"]
    bad = tmp_path / "bad.json"
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    cases = [
        (["explain", *L, "--explainer", "gpt"], ["--explainer", "local", "URL"]),
        (
            ["explain", *L, "--explainer", f"http://127.0.0.1:{free_port()}/v1", "--timeout", "2"],
            ["cannot reach", "127.0.0.1"],
        ),
        (["explain", *L, "--explainer", "http://user:pw@127.0.0.1:1/v1"], ["--api-key-env"]),
        (
            ["explain", *L, "--explainer", "http://127.0.0.1:1/v1", "--api-key-env", "NO_SUCH_KEY_VAR"],
            ["NO_SUCH_KEY_VAR", "not set"],
        ),
        (["explain", *L, "--features", "0-999"], ["out of range"]),
        (["explain", *L, "--model", str(tmp_path / "nomodel")], ["does not exist"]),
        (["explain", "--lake", root, "nope", "--quiet"], ["no analysis of SAE 'nope'"]),
        (["score", *L], ["no explained features", "lake explain"]),
        (["score", *L, "--examples", "0"], ["--examples"]),
        (["features", "--lake", root, "topk", "--limit", "-1"], ["--limit"]),
    ]
    for args, words in cases:
        code, out, err = cli(*args)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        assert all(w in lines[0] for w in words), (args, lines)
    for content, words in (
        ("[1, 2]", ["item 0", "not an object"]),
        ('[{"feature": 99, "explanation": "x"}]', ["out of range"]),
        ('[{"feature": 1, "explanation": "x", "colour": 1}]', ["unknown key 'colour'"]),
        ("{not json", ["not JSON"]),
        ('[{"feature": 1, "explanation": "ok"}, {"feature": 2, "explanation": 7}]', ["item 1", "must be a string"]),
    ):
        bad.write_text(content)
        code, _, err = cli("explain", *L, "--import", str(bad))
        assert code == 2 and all(w in err for w in words), (content, err)
    assert EmbeddedExplanations(Lake(root)).record("ex") is None  # nothing was written


def test_explain_example(tmp_path, chat_tiny, tiny_corpus):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    p = subprocess.run(
        [
            sys.executable,
            str(repo / "examples" / "explain.py"),
            "--lake",
            str(tmp_path / "lake"),
            "--model",
            chat_tiny,
            "--explainer-model",
            chat_tiny,
            "--dataset",
            tiny_corpus,
            "--hook",
            "blocks.0.hook_resid_post",
            "--context-size",
            "32",
            "--tokens",
            "640",
            "--train-tokens",
            "2048",
            "--train-batch-size",
            "256",
            "--expansion",
            "2",
            "--k",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo,
        env=dict(os.environ),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "trained and analysed topk-explain-" in p.stdout and "explained 5 features in" in p.stdout
    assert "scored" in p.stdout and p.stdout.count("  feature ") == 5 and "next: lake features" in p.stdout


KILLED_WRITER = """
import sys
from saelake.analyze.explanations import EmbeddedExplanations
from saelake.lake import Lake
st = EmbeddedExplanations(Lake(sys.argv[1]))
for i in range(10_000):
    st.update("ex", "topk", {i % 64: {"note": f"n{i}"}})
    print(i, flush=True)
"""


def test_killed_writer_leaves_the_old_rows_or_the_new(xlake, tmp_path):
    import signal
    import subprocess
    import sys

    root = str(tmp_path / "lake")
    shutil.copytree(xlake["lake"], root)
    for round_ in range(3):
        p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, root], stdout=subprocess.PIPE, text=True)
        done = [int(p.stdout.readline()) for _ in range(3 + 2 * round_)]  # some updates are through
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        st = EmbeddedExplanations(Lake(root))
        rows = st.rows("ex")  # the record names a whole table: it opens and reads
        last = {int(r["note"][1:]) for r in rows.values()}
        k = max(last)
        assert k >= done[-1]  # every finished update is there
        assert all(rows[i % 64]["note"] == f"n{i}" for i in range(max(0, k - 63), k + 1))  # and nothing torn
        from saelake.lake.checksums import file_checksum

        rec = st.record("ex")
        for path, want in rec.checksums.items():
            assert file_checksum(Lake(root).storage, Lake(root).storage.uri("analyses", "ex", path)) == want


def test_explain_and_score_into_mongo(xlake, tmp_path, chat_server):
    root = str(tmp_path / "lake")
    shutil.copytree(xlake["lake"], root)
    feats = alive(root, "ex", 2)
    srv, url = chat_server(
        lambda p: (
            "Yes" if "Does the neuron" in p or "marked tokens" in p else "Explanation: «Commas» in lists\nmore text"
        )
    )
    code, out, err = cli(
        "explain",
        "--store",
        xlake["uri"],
        "topk",
        "--analysis",
        "exm",
        "--features",
        ",".join(map(str, feats)),
        "--explainer",
        url,
        "--overwrite",
        "--top-examples",
        "2",
        "--interval-examples",
        "0",
        "--quiet",
    )  # leave examples for the scorer (6 top, 2 per interval)
    assert code == 0 and f"explained {len(feats)} features" in out, err
    code, out, err = cli(
        "score",
        "--store",
        xlake["uri"],
        "topk",
        "--analysis",
        "exm",
        "--features",
        ",".join(map(str, feats)),
        "--scorer",
        url,
        "--overwrite",
        "--quiet",
    )
    assert code == 0 and "mean detection 0.500" in out, err
    rows = MongoExplanations(MongoStore(xlake["uri"])).rows("exm", feats)
    assert [rows[f]["explanation"] for f in feats] == ["Commas in lists"] * len(feats)  # label, marks, rest cut
    assert all(rows[f]["detection"] == 0.5 and rows[f]["explainer"] == url for f in feats)
    prompt = srv.seen[0][2]["messages"][-1]["content"]
    assert "«" in prompt and "Tokens the neuron makes more likely" in prompt  # marked examples, promoted tokens
