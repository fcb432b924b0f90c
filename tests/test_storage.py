"""Object storage: the whole pipeline with shards, checkpoints and features on an S3 server.

The server is moto's S3 in server mode, a separate process on loopback that speaks the S3 HTTP
API; featx reaches it the way it reaches AWS, through pyarrow with AWS_ENDPOINT_URL and keys
from the environment. The secret key is a canary: no output, staging file or log may hold it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import make_text

from featx import storage, store_lock
from featx.config import ConfigError, ExtractConfig, IngestConfig
from featx.dataset import load_card
from featx.extract import extract
from featx.features import MANIFEST, read_features
from featx.ingest import ingest
from featx.pipeline import PipelineConfig, run_pipeline
from featx.train import RAY_RUN, TrainConfig, latest_epoch, train

BUCKET = "featx-test"
CANARY = f"featx-canary-{uuid.uuid4().hex}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A running S3 server with one bucket; the AWS_* environment points featx at it."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as f:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "featx-test-key",
        "AWS_SECRET_ACCESS_KEY": CANARY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "FEATX_CACHE": str(tmp_path_factory.mktemp("cache")),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = pafs.S3FileSystem(allow_bucket_creation=True, endpoint_override=env["AWS_ENDPOINT_URL"])
    fs.create_dir(BUCKET)
    yield fs
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.terminate()
    server.wait(timeout=30)


def objects(fs, prefix: str) -> dict[str, int]:
    sel = pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
    return {
        i.path[len(BUCKET) + len(prefix) + 2 :]: i.size
        for i in fs.get_file_info(sel)
        if i.type == pafs.FileType.File
    }


def text_source(root: Path, n: int = 48) -> Path:
    for i in range(n):
        make_text(root / f"c{i % 2}" / f"{i:03d}.txt", seed=i)
    return root


@pytest.fixture(scope="module")
def pipeline(s3, ray_cluster, tmp_path_factory):
    """ingest -> train (2 workers) -> extract, every output in the bucket."""
    src = text_source(tmp_path_factory.mktemp("src"))
    # The layout of the pipeline's workdir, so the pipeline can re-run over it.
    ds, run, feats = (f"s3://{BUCKET}/{name}" for name in ("shards", "run", "features"))
    ingested = ingest(
        IngestConfig.parse(src=src, out=ds, shard_samples=8, val_fraction=0.25, workers=1)
    )
    trained = train(
        TrainConfig.parse(
            dataset=ds, out=run, model="rnn", epochs=2, batch_size=8, workers=2, log_keys=True
        )
    )
    extracted = extract(ExtractConfig.parse(dataset=ds, checkpoint=run, out=feats))
    return src, ds, run, feats, ingested, trained, extracted


def test_pipeline_on_s3_and_pyarrow_reads_the_features(s3, pipeline):
    src, ds, run, feats, ingested, trained, extracted = pipeline
    card = load_card(ds)
    assert ingested.total == card["counts"]["train"]["total"] + card["counts"]["val"]["total"]
    assert ingested.total == 48

    # Shards, their stats and the card are objects; nothing hidden (temporaries) leaked out.
    shards = objects(s3, "shards")
    assert {s["shard"] for s in card["shards"]} == {k for k in shards if k.endswith(".tar")}
    assert all(k.replace(".tar", "_stats.json") in shards for k in shards if k.endswith(".tar"))
    runs = objects(s3, "run")
    ours = [
        *shards,
        *objects(s3, "features"),
        *(k for k in runs if not k.startswith(f"{RAY_RUN}/")),
    ]
    assert ours and not [k for k in ours if "/." in f"/{k}"]
    # each prefix ends with its listing, which names every object featx pushed there
    for prefix in ("shards", "run", "features"):
        listing = json.loads(storage.read_text(f"s3://{BUCKET}/{prefix}/{storage.LISTING}"))
        assert not listing["pending"] and listing["objects"], prefix
    assert set(json.loads(storage.read_text(f"{ds}/{storage.LISTING}"))["objects"]) == {
        k for k in shards if k != storage.LISTING
    }

    # Ray Train wrote its checkpoints to the bucket; best/, metrics and curves were pushed.
    assert trained.epochs == 2 and trained.run_dir == run
    assert any(k.startswith(f"{RAY_RUN}/checkpoint_") and k.endswith("model.pt") for k in runs)
    assert {"best/featx.json", "best/model.pt", "best/tokenizer.json", "metrics.csv"} <= set(runs)
    # version 1 fitted its tokenizer on the train shards the first ingest fitted the dataset's
    # on (the same bytes), and the model carries it
    tokenizer = storage.read_bytes(f"{ds}/tokenizer.json")
    assert storage.read_bytes(f"{run}/tokenizer.json") == tokenizer
    assert storage.read_bytes(f"{run}/best/tokenizer.json") == tokenizer
    assert json.loads(storage.read_text(f"{run}/best/featx.json"))["max_tokens"] == 256
    assert "curves.png" in runs and "run.json" in runs
    assert latest_epoch(run) == 2  # what the train flow's progress bar polls
    # Both ranks read their share from the store: every train key once per epoch.
    keys = [storage.read_text(f"{run}/keys/epoch1-rank{r}.txt").split("\n") for r in range(2)]
    train_keys = {
        e["key"]
        for s in card["shards"]
        if s["split"] == "train"
        for e in json.loads(storage.read_text(f"{ds}/{s['shard'][:-4]}_stats.json"))["entries"]
    }
    assert sorted(keys[0] + keys[1]) == sorted(train_keys)

    # Features: one part per shard, read straight from the bucket with pyarrow.
    parts = objects(s3, "features")
    assert MANIFEST in parts
    assert len([k for k in parts if k.endswith(".parquet")]) == len(card["shards"])
    manifest = json.loads(storage.read_text(f"{feats}/{MANIFEST}"))
    assert manifest["current"] == "000001" and "current" not in parts  # no links in a store
    table = pq.read_table(f"{BUCKET}/features/versions/000001/train", filesystem=s3)
    assert table.num_rows == card["counts"]["train"]["total"]
    assert sorted(table["key"].to_pylist()) == sorted(train_keys)
    X, df = read_features(feats)
    assert X.shape == (48, extracted.feature_dim) and df["key"].is_unique
    assert extracted.rows == 48 and extracted.out == feats


def test_pipeline_rerun_elsewhere_redoes_nothing_then_probes(s3, pipeline, tmp_path, monkeypatch):
    """The pipeline over the same bucket, from a machine with an empty cache: it fetches what
    the store holds, finds ingest, train and extract up to date (no object changes), and adds
    the index, dedup and map of the features, the probe's baseline features and the report to
    the bucket."""
    src, ds, run, feats, *_ = pipeline
    before = {p: objects(s3, p) for p in ("shards", "run", "features")}
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "fresh-cache"))
    cfg = PipelineConfig.parse(
        src=src,
        workdir=f"s3://{BUCKET}",
        model="rnn",
        epochs=2,
        batch_size=8,
        workers=2,
        shard_samples=8,
        val_fraction=0.25,
    )
    s = run_pipeline(cfg)
    assert s["ingest"]["up_to_date"] and s["ingest"]["ingested"] == 0
    assert s["train"]["up_to_date"]
    assert s["extract"]["up_to_date"] and s["extract"]["rows"] == 0
    after = {p: objects(s3, p) for p in before}
    # the probe's baseline features join the features prefix, and so its listing; the use
    # stage's index, dedup and map join the version they were made from
    baseline = {k for k in after["features"] if k.startswith("_baseline/")}
    made = ("_index", "_dedup", "_use")
    used = {k for k in after["features"] if k.startswith("versions/") and k.split("/")[2] in made}
    assert {
        "versions/000001/_index/index.json",
        "versions/000001/_dedup/summary.json",
        "versions/000001/_dedup/exclude.txt",
        "versions/000001/_use/map.png",
    } <= used
    assert s["used"]["index"]["rows"] == 48
    before["features"].pop(storage.LISTING)
    after["features"] = {
        k: v for k, v in after["features"].items() if k not in baseline | used | {storage.LISTING}
    }
    assert after == before
    assert any(k.endswith(".parquet") for k in baseline) and s["probe"]["accuracy"] is not None
    assert s["probe"]["baseline_dir"] == f"{feats}/_baseline/features"
    assert storage.read_text(f"s3://{BUCKET}/report.md").startswith("# featx pipeline")


def test_no_secret_reaches_outputs_staging_or_logs(s3, pipeline):
    """The secret key sits in the environment of every process of the run; it must not be
    written to any object (Parquet metadata, manifests, cards, checkpoints), any staging or
    cache file, or any Ray log."""
    _, ds, run, feats, *_ = pipeline
    needle = CANARY.encode()
    leaks = []
    for prefix in ("shards", "run", "features"):
        for key in objects(s3, prefix):
            if needle in storage.read_bytes(f"s3://{BUCKET}/{prefix}/{key}"):
                leaks.append(f"s3://{BUCKET}/{prefix}/{key}")
    files = [p for p in Path(os.environ["FEATX_CACHE"]).rglob("*") if p.is_file()]
    ray_logs = Path("/tmp/ray/session_latest/logs")
    files += [p for p in ray_logs.rglob("*") if p.is_file()] if ray_logs.is_dir() else []
    assert files, "nothing was scanned"
    leaks += [str(p) for p in files if needle in p.read_bytes()]
    assert not leaks


def test_feature_versions_in_the_store_are_kept_pruned_and_overwritten(s3, pipeline, tmp_path):
    """Features in the bucket from one model; another model into the same prefix is version 2
    (the root manifest points at it, no link is pushed), pruning removes version 1's objects,
    and --overwrite starts again at version 1 with nothing left over."""
    import torch

    from featx.checkpoint import load_model, save_model_dir
    from featx.features import part_metadata

    _, ds, run, _, *_ = pipeline
    feats = f"s3://{BUCKET}/features-overwrite"
    first = extract(ExtractConfig.parse(dataset=ds, checkpoint=run, out=feats))
    model, _ = load_model(run)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    other = tmp_path / "other"
    save_model_dir(other, model, load_card(ds), ds, metrics={})
    # Another model: version 2 beside version 1 in the bucket; keeping one removes version 1.
    second = extract(ExtractConfig.parse(dataset=ds, checkpoint=other, out=feats, keep_versions=1))
    assert (first.version, second.version) == ("000001", "000002") and second.rows == 48
    parts = [k for k in objects(s3, "features-overwrite") if k.endswith(".parquet")]
    assert all(k.startswith("versions/000002/") for k in parts), parts
    local = storage.local_copy(feats)
    shas = {part_metadata(local / k)["checkpoint_sha256"] for k in parts}
    manifest = json.loads(storage.read_text(f"{feats}/{MANIFEST}"))
    assert manifest["current"] == "000002" and [v["version"] for v in manifest["versions"]] == [
        "000002"
    ]
    assert shas == {manifest["checkpoint_sha256"]} and len(parts) == first.files_written
    X, _ = read_features(feats)
    assert len(X) == 48
    # --overwrite starts again at version 1, in the bucket too.
    again = extract(ExtractConfig.parse(dataset=ds, checkpoint=run, out=feats, overwrite=True))
    assert again.version == "000001"
    assert {k.split("/")[1] for k in objects(s3, "features-overwrite") if "/" in k} == {"000001"}


def test_a_grown_dataset_in_the_store_trains_version_2_there(s3, ray_cluster, tmp_path):
    """Model versions with RUN_DIR in the bucket: the second train after an ingest that added
    files trains version 2 from scratch (Ray Train does not resume version 1's run from the
    store), files version 1 under versions/v1/, and best/ is version 2's."""
    src = text_source(tmp_path / "src", n=24)
    ds, run = f"s3://{BUCKET}/v-shards", f"s3://{BUCKET}/v-run"
    opts = dict(dataset=ds, out=run, model="cnn", epochs=2, batch_size=8, workers=1)
    ingest(IngestConfig.parse(src=src, out=ds, shard_samples=8, val_fraction=0.25, workers=1))
    first = train(TrainConfig.parse(**opts))
    for i in range(24, 32):
        make_text(src / f"c{i % 2}" / f"{i:03d}.txt", seed=i)
    ingest(IngestConfig.parse(src=src, out=ds, shard_samples=8, val_fraction=0.25, workers=1))
    second = train(TrainConfig.parse(**opts))
    assert (first.version, second.version) == (1, 2) and second.resumed_from_epoch == 0
    assert second.epochs == 2 and second.versions_kept == [1]
    best = json.loads(storage.read_text(f"{run}/best/featx.json"))
    v1 = json.loads(storage.read_text(f"{run}/versions/v1/best/featx.json"))
    assert best["version"] == 2 and best["dataset_fingerprint"] == load_card(ds)["fingerprint"]
    assert v1["version"] == 1 and v1["dataset_fingerprint"] != best["dataset_fingerprint"]
    assert json.loads(storage.read_text(f"{run}/run.json"))["version"] == 2


def test_an_unknown_scheme_or_a_non_featx_prefix_is_refused(s3, tmp_path):
    src = text_source(tmp_path / "src", n=4)
    with pytest.raises(ConfigError, match="nosuch://"):
        ingest(IngestConfig.parse(src=src, out="nosuch://bucket/ds"))
    with s3.open_output_stream(f"{BUCKET}/other/notes.txt") as f:
        f.write(b"not featx")
    with pytest.raises(ConfigError, match="holds objects but no featx shards"):
        ingest(IngestConfig.parse(src=src, out=f"s3://{BUCKET}/other"))
    assert objects(s3, "other") == {"notes.txt": 9}


@pytest.mark.parametrize(
    ("address", "shown"),
    [
        ("127.0.0.1:6379", "127.0.0.1:6379"),
        ("ray://head:10001", "ray://head:10001"),
        ("ray://alice:s3cret@head:10001", "ray://***@head:10001"),
        ("alice:s3cret@head:10001", "***@head:10001"),
        ("https://token:s3cret@ray.example.com/api", "https://***@ray.example.com/api"),
        ("s3://AKIAKEY:s3cret@bucket/ds", "s3://***@bucket/ds"),
        ("s3://key:p@ss@bucket/ds", "s3://***@bucket/ds"),  # an "@" in the password
        ("ray://alice:s3cret@[::1]:10001", "ray://***@[::1]:10001"),
        ("s3://bucket/photos/a@2x.png", "s3://bucket/photos/a@2x.png"),  # "@" in the path
        ("data/a@2x", "data/a@2x"),
    ],
)
def test_redact_hides_the_user_part_of_an_address(address, shown):
    """One function hides credentials everywhere: storage URIs and Ray addresses alike."""
    from featx import cluster

    assert storage.redact(address) == shown
    assert cluster.redact is storage.redact  # what init_ray logs a cluster address with


def test_credentials_in_a_uri_move_to_the_environment_before_any_config(monkeypatch):
    """A config never holds the credentials of an `s3://KEY:SECRET@bucket` URI: they move to
    the AWS variables pyarrow reads; two URIs with different credentials are refused."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    cfg = ExtractConfig.parse(
        dataset="s3://AK:p@ss@bucket/ds", checkpoint="s3://AK:p@ss@bucket/run", out="s3://b/f"
    )
    assert (cfg.dataset, cfg.checkpoint) == ("s3://bucket/ds", "s3://bucket/run")
    assert "p@ss" not in cfg.model_dump_json()
    assert os.environ["AWS_ACCESS_KEY_ID"] == "AK" and os.environ["AWS_SECRET_ACCESS_KEY"] == "p@ss"
    assert storage.lift_credentials("s3://bucket/photos/a@2x.png") == "s3://bucket/photos/a@2x.png"
    with pytest.raises(ConfigError, match="other credentials"):
        ExtractConfig.parse(dataset="s3://A:x@b/ds", checkpoint="s3://B:y@b/run", out="s3://b/f")


def test_downloads_are_published_whole_or_not_at_all(tmp_path):
    """Downloads and caches write through `fsutil.atomic_path`: a failed write leaves neither
    the file nor a temporary, and a finished one is in place under its name."""
    from featx.fsutil import atomic_path

    dest = tmp_path / "model.pt"
    with pytest.raises(OSError) as e, atomic_path(dest) as tmp:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")
    assert e.value.filename == str(dest)  # the file being written, not a hidden temporary
    assert list(tmp_path.iterdir()) == []
    with atomic_path(dest) as tmp:
        tmp.write_bytes(b"whole")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"] and dest.read_bytes() == b"whole"


def test_locations_and_redaction():
    assert storage.location("s3://bucket/ds/") == "s3://bucket/ds"
    assert storage.location("file:///data/ds") == Path("/data/ds")
    assert storage.location("data/ds") == Path("data/ds")
    assert storage.join("s3://bucket/ds", "train", "shard-000000.tar") == (
        "s3://bucket/ds/train/shard-000000.tar"
    )
    assert storage.display("s3://AKIAKEY:s3cret@bucket/ds") == "s3://***@bucket/ds"
    assert "s3cret" not in storage.display("gs://user:s3cret@bucket")
    assert storage.display(Path("me@work/ds")) == "me@work/ds"  # a local path as it is
    a, b = storage.staging("s3://a/ds"), storage.staging("s3://b/ds")
    assert a != b and a.name.startswith("ds-")  # one staging folder per URI


def test_overwrite_never_deletes_what_is_not_this_stages_output(s3, pipeline):
    """`--overwrite` with an output prefix that holds other data (the bucket's root, holding
    the dataset, the run and the features; or another stage's output) is refused before
    anything is deleted, in the store as on disk."""
    _, ds, run, feats, *_ = pipeline
    sel = pafs.FileSelector(BUCKET, recursive=True)
    before = {i.path: i.size for i in s3.get_file_info(sel)}
    root = f"s3://{BUCKET}"
    with pytest.raises(ConfigError, match="refusing to --overwrite"):
        extract(ExtractConfig.parse(dataset=ds, checkpoint=run, out=root, overwrite=True))
    with pytest.raises(ConfigError, match="refusing to --overwrite"):
        extract(ExtractConfig.parse(dataset=ds, checkpoint=run, out=run, overwrite=True))
    with pytest.raises(ConfigError, match="refusing to --overwrite"):
        train(TrainConfig.parse(dataset=ds, out=ds, epochs=1, workers=1, overwrite=True))
    with pytest.raises(ConfigError, match="no featx shards"):
        ingest(IngestConfig.parse(src=Path(__file__).parent, out=feats, overwrite=True))
    assert {i.path: i.size for i in s3.get_file_info(sel)} == before


def test_credentials_in_a_uri_reach_no_output_log_or_prefect_record(s3, tmp_path):
    """A whole `featx pipeline` run with the access key and secret inside its workdir URI
    (`s3://KEY:SECRET@bucket/...`): the secret is in no object of the bucket, no staged or
    cached file, not in report.md, the Prefect database and logs (artifacts, flow-run
    parameters, printed lines), the command's output or a Ray log."""
    secret = f"uri-canary-{uuid.uuid4().hex}"
    workdir = f"s3://featx-uri-key:{secret}@{BUCKET}/uri-pipeline"
    src = text_source(tmp_path / "src", n=24)
    home, cache = tmp_path / "prefect-home", tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_ADDRESS"))}
    env.update(PREFECT_HOME=str(home), FEATX_CACHE=str(cache))
    cmd = [sys.executable, "-m", "featx.cli", "pipeline", str(src), "--workdir", workdir]
    cmd += ["--epochs", "1", "--workers", "1", "--batch-size", "8", "--shard-samples", "8"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "uri-pipeline" in r.stdout + r.stderr  # it did talk about its workdir, redacted
    needle = secret.encode()
    leaks = [name for name, text in (("stdout", r.stdout), ("stderr", r.stderr)) if secret in text]
    sel = pafs.FileSelector(BUCKET, recursive=True)
    objs = [i.path for i in s3.get_file_info(sel) if i.type == pafs.FileType.File]
    assert any(p.endswith("uri-pipeline/report.md") for p in objs)
    leaks += [p for p in objs if needle in s3.open_input_stream(p).read()]
    files = [p for root in (home, cache) for p in root.rglob("*") if p.is_file()]
    ray_logs = Path("/tmp/ray/session_latest/logs")
    files += [p for p in ray_logs.rglob("*") if p.is_file()] if ray_logs.is_dir() else []
    assert any(p.suffix == ".db" for p in files), "the Prefect database was not found"
    leaks += [str(p) for p in files if needle in p.read_bytes()]
    assert not leaks


_PUSH = """
import sys
from pathlib import Path
from featx import storage, store_lock
print("pushing", flush=True)
storage.push(Path(sys.argv[1]), sys.argv[2])
"""


def test_an_upload_interrupted_at_seeded_moments_never_leaves_a_truncated_object(s3, tmp_path):
    """Ctrl-C in the middle of a push closes pyarrow's output stream, which commits what it
    holds. Interrupted at 5 seeded moments, a push leaves each object whole or absent, never
    cut short under its name; the next push completes, a pull elsewhere gets the same bytes
    and skips what an interrupted upload left, and a pull removes a local copy of an object
    featx deleted from the store."""
    import hashlib
    import random
    import signal

    local, uri = tmp_path / "out", f"s3://{BUCKET}/uploads"
    (local / "train").mkdir(parents=True)
    for i in range(3):
        (local / "train" / f"shard-{i:06d}.tar").write_bytes(random.Random(i).randbytes(24 << 20))
    want = {
        f"train/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (local / "train").iterdir()
    }
    moments, landed = random.Random(7), 0
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", _PUSH, str(local), uri],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert proc.stdout.readline().strip() == "pushing"
        time.sleep(moments.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGINT)
        landed += proc.wait(60) != 0
        for rel, size in objects(s3, "uploads").items():
            assert not rel.split("/")[-1].startswith("shard-") or size == 24 << 20, rel
        # forget what the last push recorded, so that each run uploads every file again
        storage._index_path(local).unlink(missing_ok=True)
    assert landed >= 3, f"only {landed} interruptions landed during an upload"
    assert storage.push(local, uri) == 3
    fresh = tmp_path / "fresh"
    storage.pull(uri, fresh)
    got = {
        f"train/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (fresh / "train").iterdir()
    }
    assert got == want  # no hidden upload left-over came along
    s3.delete_file(f"{BUCKET}/uploads/train/shard-000001.tar")  # featx compacted it elsewhere
    storage.pull(uri, fresh)
    assert sorted(p.name for p in (fresh / "train").iterdir()) == [
        "shard-000000.tar",
        "shard-000002.tar",
    ]


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_pull_takes_only_objects_the_listing_vouches_for(s3, tmp_path, caplog):
    """Each push ends with a listing of its objects' sizes and sha256s. An object changed in
    the store behind featx's back (other bytes of the right size) or added there is refused
    by a pull: named in a warning, not downloaded, and a good local copy stays as it was."""
    uri = f"s3://{BUCKET}/verified"
    a, b, c = (tmp_path / n for n in "abc")
    (a / "data").mkdir(parents=True)
    (a / "data" / "part-0.bin").write_bytes(b"v1" * 500)
    (a / "card.json").write_text("{}")
    assert storage.push(a, uri) == 2
    assert storage.pull(uri, b) == 2 and _files(b) == _files(a)
    v2 = b"v2" * 1000
    (a / "data" / "part-0.bin").write_bytes(v2)
    assert storage.push(a, uri) == 1
    listing = json.loads(storage.read_text(f"{uri}/{storage.LISTING}"))
    assert listing == {
        "objects": {
            "card.json": [2, hashlib.sha256(b"{}").hexdigest()],
            "data/part-0.bin": [2000, hashlib.sha256(v2).hexdigest()],
        },
        "pending": {},
    }
    with s3.open_output_stream(f"{BUCKET}/verified/data/part-0.bin") as f:
        f.write(b"xx" * 1000)  # same size, other bytes
    with s3.open_output_stream(f"{BUCKET}/verified/data/part-9.bin") as f:
        f.write(b"no push wrote this")
    with caplog.at_level(logging.WARNING, logger="featx.storage"):
        assert storage.pull(uri, b) == 0
    assert _files(b) == {"card.json": b"{}", "data/part-0.bin": b"v1" * 500}  # kept as it was
    warned = [r.getMessage() for r in caplog.records if r.name == "featx.storage"]
    assert any("verified/data/part-0.bin" in w and "sha256" in w for w in warned), warned
    assert any("verified/data/part-9.bin" in w and "does not name it" in w for w in warned)
    storage.pull(uri, c)  # a fresh folder gets only what the listing vouches for
    assert _files(c) == {"card.json": b"{}"}
    # the writer's next push of that file puts verified bytes back; the next pull takes them
    (a / "data" / "part-0.bin").write_bytes(v2 + b"!")
    assert storage.push(a, uri) == 1 and storage.pull(uri, c) == 1
    assert _files(c) == {"card.json": b"{}", "data/part-0.bin": v2 + b"!"}


def test_a_push_cut_short_leaves_only_objects_a_pull_can_verify(s3, tmp_path, monkeypatch):
    """Before its uploads a push lists the new digests beside the old, so a pull after a push
    that died half way takes each object in the version it finds, old or new, and refuses
    nothing; the next push completes the listing."""
    uri = f"s3://{BUCKET}/cut-short"
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    for name in ("x.bin", "y.bin"):
        (a / name).write_bytes(b"old " + name.encode())
    storage.push(a, uri)
    for name in ("x.bin", "y.bin"):
        (a / name).write_bytes(b"new contents of " + name.encode())
    upload, calls = storage._upload, []

    def dies_on_the_second(fs, src, dest):
        calls.append(dest)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return upload(fs, src, dest)

    monkeypatch.setattr(storage, "_upload", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        storage.push(a, uri)
    monkeypatch.setattr(storage, "_upload", upload)
    assert storage.pull(uri, b) == 2
    assert _files(b) == {"x.bin": b"new contents of x.bin", "y.bin": b"old y.bin"}
    assert storage.push(a, uri) == 1
    listing = json.loads(storage.read_text(f"{uri}/{storage.LISTING}"))
    assert not listing["pending"] and storage.pull(uri, b) == 1
    assert _files(b) == _files(a)


def test_the_listing_leaves_out_what_ray_train_writes_in_place():
    """Ray Train writes its checkpoints into a RUN_DIR in the store itself; push never lists
    them and pull takes them as they are. The patterns must follow run_dir's names."""
    from featx.run_dir import KEYS_DIR, RAY_RUN

    assert (f"{RAY_RUN}/*", f"{KEYS_DIR}/*") == storage.IN_PLACE


def _lock(prefix: str) -> dict | None:
    uri = f"s3://{BUCKET}/{prefix}/{store_lock.LOCK}"
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def test_a_second_writer_is_refused_while_the_first_holds_the_prefix(s3, monkeypatch):
    """A stage holds a lease on its output prefix: a second writer is refused at once with the
    holder and the lease's end; renewals keep the lease past its length; the lock is released
    when the stage ends, also when it fails, and the next writer gets in."""
    monkeypatch.setattr(store_lock, "LEASE_S", 3.0)  # renewed each second
    uri = f"s3://{BUCKET}/locked"
    with storage.staged_output(uri, what="extract") as local:
        (local / "a.txt").write_text("one")
        held = _lock("locked")
        assert held["stage"] == "extract" and held["pid"] == os.getpid()
        time.sleep(3.5)  # past one lease length
        with pytest.raises(ConfigError) as refused, storage.staged_output(uri, what="ingest"):
            pytest.fail("a second writer got in")
        assert _lock("locked")["expires"] > held["expires"]  # renewed
    msg = str(refused.value)
    assert f"{uri} is being written by featx extract on {socket.gethostname()}" in msg
    assert f"pid {os.getpid()}" in msg and "lease runs to" in msg and "Wait for it" in msg
    assert _lock("locked") is None and objects(s3, "locked").keys() == {"a.txt", storage.LISTING}
    with pytest.raises(RuntimeError, match="boom"), storage.staged_output(uri):
        assert _lock("locked") is not None
        raise RuntimeError("boom")
    assert _lock("locked") is None
    with storage.staged_output(uri, what="ingest") as local:
        assert (local / "a.txt").read_text() == "one"


def test_a_first_ingest_into_a_prefix_another_writer_holds_names_the_holder(s3, tmp_path):
    """The lock object (and a push's listing) are featx's bookkeeping, not foreign objects: a
    second first ingest into a new prefix is refused by the lock, naming who holds it."""
    src = text_source(tmp_path / "src", n=4)
    uri = f"s3://{BUCKET}/first"
    with storage.staged_output(uri, what="ingest"), pytest.raises(ConfigError) as refused:
        ingest(IngestConfig.parse(src=src, out=uri, workers=1))
    assert "is being written by featx ingest" in str(refused.value)
    ingest(IngestConfig.parse(src=src, out=uri, workers=1))  # once released, it goes in
    assert load_card(uri)["counts"]["train"]["total"] > 0


def test_an_expired_lease_is_taken_over_by_one_writer_only(s3, monkeypatch, caplog):
    """A writer that died without releasing (elsewhere) holds the prefix until its lease
    lapses by the store's clock; then one writer takes it over, conditional on the lock it
    saw, so a second taker that saw the same lock loses."""
    uri = f"s3://{BUCKET}/lapsed"
    stale = {"host": "gone.example", "pid": 1, "stage": "train", "lease_s": 1.0}
    with s3.open_output_stream(f"{BUCKET}/lapsed/{store_lock.LOCK}") as f:
        f.write(json.dumps(stale).encode())
    fs, path = storage.filesystem(uri)
    seen = store_lock.client(fs).head_object(Bucket=BUCKET, Key=f"lapsed/{store_lock.LOCK}")
    time.sleep(2.1)  # the store's clock counts whole seconds
    key = f"lapsed/{store_lock.LOCK}"
    with (
        caplog.at_level(logging.WARNING, logger="featx.store_lock"),
        storage.staged_output(uri, what="extract"),
    ):
        assert _lock("lapsed")["stage"] == "extract"
        other = store_lock._Lease(store_lock.client(fs), BUCKET, key, uri, "ingest")
        with pytest.raises(Exception) as lost:
            other._put(IfMatch=seen["ETag"])  # the other taker saw the stale lock too
        assert store_lock._code(lost.value) == "PreconditionFailed"
        with pytest.raises(ConfigError, match="being written by featx extract"):
            other.take()
    assert "took over" in caplog.text and "gone.example" in caplog.text
    assert _lock("lapsed") is None


def test_a_lock_left_by_a_dead_process_on_this_machine_is_taken_at_once(s3):
    """Killed without releasing (SIGKILL, out of memory): the next run on the same machine
    finds the holder's process gone and does not wait out its lease."""
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    body = {
        "host": socket.gethostname(),
        "pid": dead.pid,
        "pidns": store_lock._pid_namespace(),
        "stage": "ingest",
        "lease_s": 600.0,
    }
    with s3.open_output_stream(f"{BUCKET}/dead/{store_lock.LOCK}") as f:
        f.write(json.dumps(body).encode())
    with storage.staged_output(f"s3://{BUCKET}/dead", what="ingest"):
        assert _lock("dead")["pid"] == os.getpid()


def test_overwrite_under_the_lock_clears_all_but_the_lock(s3):
    """--overwrite deletes the prefix's objects while the stage holds the prefix: the lock
    stays (no other writer slips in), and a prefix holding only featx's lock and listing
    counts as empty."""
    uri = f"s3://{BUCKET}/cleared"
    for key in ("card.json", "train/shard-000000.tar"):
        with s3.open_output_stream(f"{BUCKET}/cleared/{key}") as f:
            f.write(b"old")
    with storage.staged_output(uri, overwrite=True, markers=("card.json",)) as local:
        assert objects(s3, "cleared").keys() == {store_lock.LOCK}
        assert storage._empty(uri)
        (local / "card.json").write_text("{}")
    assert objects(s3, "cleared").keys() == {"card.json", storage.LISTING}
    s3.delete_file(f"{BUCKET}/cleared/card.json")
    storage.check_overwrite(uri, ("card.json",))  # only the listing is left: empty


def test_a_lock_the_store_refuses_is_a_config_error(s3):
    """No bucket, no credentials, no server: a ConfigError that names the lock, not a
    traceback from boto3."""
    uri = "s3://featx-no-such-bucket/x"
    with pytest.raises(ConfigError, match=f"could not take {uri}/.featx-lock"):  # noqa: SIM117
        with storage.staged_output(uri):
            pytest.fail("wrote without the lock")


def test_the_lock_reaches_the_store_pyarrow_reaches(s3):
    """boto3 takes the lock, pyarrow moves the data: both reach one server. The endpoint and
    region come from what pyarrow resolved (AWS_ENDPOINT_URL, or the URI's query), read from
    its pickle state; this fails if a pyarrow release drops it."""
    fs, _ = storage.filesystem(f"s3://{BUCKET}/x")
    assert store_lock.client(fs).meta.endpoint_url == os.environ["AWS_ENDPOINT_URL"]
    fs, _ = pafs.FileSystem.from_uri(
        "s3://b/x?endpoint_override=h.invalid:9&scheme=http&region=eu-west-1"
    )
    c = store_lock.client(fs)
    assert (c.meta.endpoint_url, c.meta.region_name) == ("http://h.invalid:9", "eu-west-1")
