"""Bad input: one clear line on stderr, exit status 2, no traceback, the lake as it was."""

from pathlib import Path

import pytest

from tests.conftest import HOOKS, cli, free_port, ingest_tiny


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture(scope="module")
def lake(tmp_path_factory, tiny_model, tiny_corpus):
    root = tmp_path_factory.mktemp("bad") / "lake"
    ingest_tiny(str(root), tiny_model, tiny_corpus, run="existing", tokens=500)
    return root


CASES = {
    "unknown hook": (dict(hooks="blocks.0.hook_resid_postt"), "did you mean blocks.0.hook_resid_post"),
    "model path missing": (dict(model="/no/such/model"), "model path /no/such/model does not exist"),
    "not a model": (dict(model="{tmp}"), "is not a model directory"),
    "unknown builtin": (dict(dataset="builtin:klingon"), "unknown built-in corpus"),
    "dataset missing": (dict(dataset="/no/such/corpus.jsonl"), "does not exist"),
    "text column missing": (dict(dataset="{jsonl}", text_column="text"), "columns are ['body']"),
    "context too long": (dict(context_size="128"), "larger than"),
    "tokens zero": (dict(tokens="0"), "--tokens must be positive"),
    "tokens negative": (dict(tokens="-5"), "--tokens must be positive"),
    "run exists": (dict(run="existing"), "already exists"),
    "resume missing run": (dict(run="ghost", extra=["--resume"]), "does not exist"),
    "append missing run": (dict(run="ghost", extra=["--append"]), "does not exist"),
    "resume other settings": (dict(run="existing", tokens="500", extra=["--resume"], seed="7"), "seed=0"),
    "bad dtype": (dict(dtype="float64"), "unsupported dtype"),
    "bad layout": (dict(layout="3d"), "unknown layout"),
    "bad run name": (dict(run="../escape"), "invalid run name"),
    "per-head hook": (dict(hooks="blocks.0.attn.hook_result"), "one vector per token"),
    "empty jsonl": (dict(dataset="{empty}"), "is empty: no documents to read"),
    "binary jsonl": (dict(dataset="{binary}"), "as a json file"),
    "nproc zero": (dict(extra=["--nproc", "0"]), "--nproc must be at least 1, got 0"),
    "nproc negative": (dict(extra=["--nproc", "-2"]), "--nproc must be at least 1, got -2"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_ingest_input(case, lake, tiny_model, tiny_corpus, tmp_path):
    over, expected = CASES[case]
    (tmp_path / "c.jsonl").write_text('{"body": "hello there"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)) * 8)
    args = dict(
        model=tiny_model,
        dataset=tiny_corpus,
        hooks=",".join(HOOKS),
        tokens="600",
        context_size="32",
        run="new",
        text_column="text",
        dtype="float16",
        layout="1d,2d",
        seed="0",
    )
    extra = over.pop("extra", [])
    args.update(
        {
            k: v.format(
                tmp=tmp_path,
                jsonl=tmp_path / "c.jsonl",
                empty=tmp_path / "empty.jsonl",
                binary=tmp_path / "binary.jsonl",
            )
            for k, v in over.items()
        }
    )
    before = _listing(lake)
    argv = ["ingest", "--lake", str(lake), "--quiet", *extra]
    for k, v in args.items():
        argv += [f"--{k.replace('_', '-')}", v]
    code, out, err = cli(*argv)
    assert code == 2, (code, out, err)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert expected in err, err
    assert "Traceback" not in err
    assert _listing(lake) == before


def test_lake_path_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = cli("ls", "--lake", str(f))
    assert code == 2 and "is a file" in err and len(err.strip().splitlines()) == 1


def test_unreachable_s3_endpoint_is_named(monkeypatch):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    code, _, err = cli("ls", "--lake", "s3://bucket/lake")
    assert code == 2 and f"cannot reach S3 endpoint http://127.0.0.1:{port}" in err
    assert len(err.strip().splitlines()) == 1 and "testing" not in err


def test_missing_s3_bucket_is_named(s3_env):
    code, _, err = cli("ls", "--lake", "s3://no-such-bucket-here/lake")
    assert code == 2 and "bucket 'no-such-bucket-here' does not exist" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["soon", "0", "-3", "nan"])
def test_bad_s3_timeout_is_named(s3_env, monkeypatch, value):
    monkeypatch.setenv("SAELAKE_S3_TIMEOUT", value)
    code, _, err = cli("ls", "--lake", f"s3://{s3_env['bucket']}/lake")
    assert code == 2 and f"SAELAKE_S3_TIMEOUT={value!r}" in err and "seconds" in err, err
    assert len(err.strip().splitlines()) == 1
