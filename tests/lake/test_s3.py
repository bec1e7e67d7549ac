"""The same ingest/query/read path against a real S3 HTTP server (moto) on 127.0.0.1."""
import json

import lance

from tests.conftest import HOOKS, cli, ingest_tiny
from saelake.lake import Lake, SnapshotSource


def test_ingest_query_and_read_on_s3(s3_env, tiny_model, tiny_corpus, tiny_lake):
    uri = f"s3://{s3_env['bucket']}/lakes/one"
    m = ingest_tiny(uri, tiny_model, tiny_corpus)  # same settings as the local tiny_lake
    assert m["status"] == "complete"
    code, out, err = cli("query", "--lake", uri, "--json", "select name, tokens from runs")
    assert code == 0, err
    assert json.loads(out) == [{"name": "r1", "tokens": m["tokens"]}]
    # pylance opens the table on S3 directly
    opts = Lake(uri).storage.storage_options
    t = lance.dataset(f"{uri}/runs/r1/tokens.lance", storage_options=opts).to_table()
    local = lance.dataset(f"{tiny_lake}/runs/r1/tokens.lance").to_table()
    assert t.equals(local)  # S3 and local ingests of the same input are identical
    # the reader works the same on S3
    src = SnapshotSource(uri, "r1")
    n = sum(len(b) for b in src.token_batches(500, [HOOKS[0]], seed=1))
    assert n == m["rows_1d"]
    # credentials never land in the lake
    raw = Lake(uri).storage.fs.cat(f"{uri}/runs/r1/manifest.json").decode()
    assert "testing" not in raw and s3_env["AWS_ENDPOINT_URL"] not in raw
    # the catalog of a remote lake is a local file, rebuilt from the manifests on demand
    cat = Lake(uri).catalog.path
    cat.unlink()
    code, out, _ = cli("ls", "--lake", uri, "--json")
    assert code == 0 and json.loads(out)["runs"][0]["name"] == "r1"
