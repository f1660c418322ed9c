"""Object stores: `s3://BUCKET/PREFIX` as input and as output, against a real S3-compatible server
(moto's, from PyPI) started on loopback by the test suite, with boto3 as the independent client
that puts the inputs and reads the outputs back.

What must hold: the objects written are byte-identical to the files a local conversion writes
(names included, as the plan says); nothing is visible at the destination until the whole output
is written and checked (a refused or interrupted conversion leaves no object and no pending
multipart upload); connections dropped mid-answer are retried into the same bytes; parts
written by independent processes finish into the same bytes; the usual credential sources work;
errors name the object."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import torch
from safetensors.torch import save_file

from conftest import BIN, ROOT, run

TINY = ROOT / "examples" / "tiny-bert"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(env=None):
    """Starts moto's S3 server on a free loopback port; returns the process and endpoint."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=None if env is None else dict(os.environ, **env))
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the moto S3 server did not start")


@pytest.fixture(scope="module")
def moto():
    proc, endpoint = start_moto()
    yield endpoint
    proc.terminate()
    proc.wait(10)


@pytest.fixture()
def s3(moto, monkeypatch, tmp_path):
    """A fresh bucket; the environment points weightcast and boto3 at the server."""
    import boto3

    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # No stray credentials files of the machine.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    client = boto3.client("s3", endpoint_url=moto)
    bucket = "b-" + uuid.uuid4().hex[:12]
    client.create_bucket(Bucket=bucket)
    client.bucket = bucket
    return client


def upload_folder(s3, folder, prefix):
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            s3.upload_file(str(p), s3.bucket, f"{prefix}/{p.relative_to(folder).as_posix()}")


def objects(s3, prefix):
    """{relative name: bytes} of the objects under prefix."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket,
                                                             Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            body = s3.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read()
            out[o["Key"][len(prefix) + 1:]] = body
    return out


def files_of(d):
    return {f.relative_to(d).as_posix(): f.read_bytes() for f in sorted(d.rglob("*"))
            if f.is_file()}


def pending_uploads(s3):
    return s3.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])


def url(s3, key):
    return f"s3://{s3.bucket}/{key}"


def test_folder_from_and_to_s3_equals_local(s3, tmp_path, minilm):
    upload_folder(s3, minilm, "minilm")
    opts = ["--to", "f16", "--preset", "keep-norms", "--max-shard-size", "20MB"]
    run("convert", minilm, "-o", tmp_path / "ref", *opts)
    ref = files_of(tmp_path / "ref")
    assert "model.safetensors.index.json" in ref and len(ref) > 4
    # s3 -> s3, s3 -> local, local -> s3: the same bytes under the same names.
    run("convert", url(s3, "minilm"), "-o", url(s3, "out"), *opts)
    assert objects(s3, "out") == ref
    run("convert", url(s3, "minilm"), "-o", tmp_path / "local", *opts)
    assert files_of(tmp_path / "local") == ref
    run("convert", minilm, "-o", url(s3, "up"), *opts)
    assert objects(s3, "up") == ref
    # The plan names exactly the objects written.
    plan = json.loads(run("convert", url(s3, "minilm"), "-o", url(s3, "out2"), *opts,
                          "--dry-run", "--json").stdout)
    written = objects(s3, "out")
    assert plan["index"] == "model.safetensors.index.json"
    shards = [f["name"] for f in plan["files"]]
    assert set(written) == set(shards) | {plan["index"]} | {
        f.relative_to(minilm).as_posix() for f in minilm.rglob("*")
        if f.is_file() and f.name != "model.safetensors" and not f.name.startswith(".")}
    planned = {t["name"]: t for t in plan["tensors"]}
    seen = {}
    for shard in shards:
        body = written[shard]
        header = json.loads(body[8:8 + int.from_bytes(body[:8], "little")])
        header.pop("__metadata__", None)
        for name, t in header.items():
            assert (t["dtype"], t["shape"]) == (planned[name]["to"], planned[name]["shape"])
            seen[name] = shard
    assert seen == json.loads(written[plan["index"]])["weight_map"]
    assert set(seen) == set(planned)
    assert not pending_uploads(s3)


def test_sharded_input_single_file_and_pt_output(s3, tmp_path, minilm):
    sharded = tmp_path / "sharded"
    run("convert", minilm, "-o", sharded, "--to", "f32", "--max-shard-size", "20MB")
    upload_folder(s3, sharded, "sharded")
    s3.upload_file(str(minilm / "model.safetensors"), s3.bucket, "one/model.safetensors")
    # A sharded input read by ranges, into one local file.
    run("convert", url(s3, "sharded"), "-o", tmp_path / "a.safetensors", "--to", "bf16")
    run("convert", sharded, "-o", tmp_path / "b.safetensors", "--to", "bf16")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    # One object named by its URL, into a .safetensors object and a .pt object.
    run("convert", url(s3, "one/model.safetensors"), "-o", url(s3, "x/m.safetensors"),
        "--to", "f16")
    run("convert", minilm / "model.safetensors", "-o", tmp_path / "m.safetensors", "--to", "f16")
    assert objects(s3, "x") == {"m.safetensors": (tmp_path / "m.safetensors").read_bytes()}
    run("convert", url(s3, "one/model.safetensors"), "-o", url(s3, "pt/model.pt"), "--to", "f16")
    body = s3.get_object(Bucket=s3.bucket, Key="pt/model.pt")["Body"].read()
    (tmp_path / "model.pt").write_bytes(body)
    sd = torch.load(tmp_path / "model.pt", weights_only=True)
    from safetensors.torch import load_file

    src = load_file(minilm / "model.safetensors")
    assert set(sd) == set(src)
    for k, v in src.items():
        want = v.to(torch.float16) if v.is_floating_point() else v
        assert torch.equal(sd[k], want), k


def test_nothing_visible_until_complete(s3, tmp_path):
    # A tensor that overflows f16: refused after its upload, which is aborted.
    big = {"a": torch.randn(1024, 1024), "b": torch.full((4,), 1e6)}
    save_file(big, tmp_path / "m.safetensors")
    s3.upload_file(str(tmp_path / "m.safetensors"), s3.bucket, "in/m.safetensors")
    for out in ("o/m.safetensors", "o/sharded.safetensors.index.json"):
        p = run("convert", url(s3, "in/m.safetensors"), "-o", url(s3, out), "--to", "f16",
                "--max-shard-size", "1MB", check=False)
        assert p.returncode == 1 and "would overflow" in p.stderr, p.stderr
        assert objects(s3, "o") == {}
        assert not pending_uploads(s3)
    # An existing output is kept without --force; with it, replaced, and a folder's stale
    # objects go (as a local --force replaces the folder).
    upload_folder(s3, TINY, "tiny")
    run("convert", url(s3, "tiny"), "-o", url(s3, "out"), "--to", "f16")
    s3.put_object(Bucket=s3.bucket, Key="out/stale.bin", Body=b"old")
    before = objects(s3, "out")
    p = run("convert", url(s3, "tiny"), "-o", url(s3, "out"), "--to", "bf16", check=False)
    assert p.returncode == 2 and "already exists" in p.stderr
    assert objects(s3, "out") == before
    run("convert", url(s3, "tiny"), "-o", url(s3, "out"), "--to", "bf16", "--force")
    run("convert", TINY, "-o", tmp_path / "ref", "--to", "bf16")
    assert objects(s3, "out") == files_of(tmp_path / "ref")
    # The input is never the output.
    p = run("convert", url(s3, "tiny"), "-o", url(s3, "tiny"), "--to", "f16", "--force",
            check=False)
    assert p.returncode == 2 and "overwrite the input" in p.stderr, p.stderr
    p = run("convert", url(s3, "tiny"), "-o", f"s3://{s3.bucket}", "--to", "f16", "--force",
            check=False)
    assert p.returncode == 2 and "contains the input" in p.stderr, p.stderr


def test_interrupted_upload_leaves_nothing(s3, tmp_path):
    g = torch.Generator().manual_seed(1)
    save_file({f"w{i}": torch.randn(1024, 2048, generator=g) for i in range(24)},
              tmp_path / "m.safetensors")
    s3.upload_file(str(tmp_path / "m.safetensors"), s3.bucket, "in/m.safetensors")
    proc = subprocess.Popen([BIN, "convert", url(s3, "in/m.safetensors"), "-o",
                             url(s3, "o/m.safetensors"), "--to", "f16"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait for the first part to be under way, then Ctrl-C.
    deadline = time.time() + 60
    while time.time() < deadline and not pending_uploads(s3) and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert objects(s3, "o") == {}
    assert not pending_uploads(s3)


def test_parts_into_s3_equal_one_run(s3, tmp_path, minilm):
    upload_folder(s3, minilm, "minilm")
    opts = ["--to", "bf16", "--max-shard-size", "15MB"]
    run("convert", minilm, "-o", tmp_path / "ref", *opts)
    out = url(s3, "parts")
    p = run("convert", url(s3, "minilm"), "-o", out, *opts, "--part", "finish", check=False)
    assert p.returncode == 1 and "missing" in p.stderr
    # Independent processes, in any order.
    procs = [subprocess.Popen([BIN, "convert", url(s3, "minilm"), "-o", out, *opts, "--part",
                               f"{k}/3"], stderr=subprocess.PIPE, text=True) for k in (3, 1, 2)]
    for pr in procs:
        _, err = pr.communicate(timeout=300)
        assert pr.returncode == 0, err
    assert "model.safetensors.index.json" not in objects(s3, "parts")
    run("convert", url(s3, "minilm"), "-o", out, *opts, "--part", "finish")
    assert objects(s3, "parts") == files_of(tmp_path / "ref")
    # A shard of another conversion is refused by finish.
    first = sorted(f.name for f in (tmp_path / "ref").glob("model-*.safetensors"))[0]
    s3.put_object(Bucket=s3.bucket, Key=f"parts/{first}", Body=b"x" * 16)
    p = run("convert", url(s3, "minilm"), "-o", out, *opts, "--part", "finish", "--force",
            check=False)
    assert p.returncode == 1 and "not the shard this plan writes" in p.stderr, p.stderr


def test_credentials_from_the_shared_files_and_errors(s3, tmp_path, monkeypatch, moto):
    upload_folder(s3, TINY, "tiny")
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        "[default]\naws_access_key_id = nope\naws_secret_access_key = nope\n"
        "[dev]\naws_access_key_id = test\naws_secret_access_key = test\n")
    (home / ".aws" / "config").write_text(
        f"[profile dev]\nregion = us-east-1\nendpoint_url = {moto}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(home), AWS_PROFILE="dev")
    run("convert", url(s3, "tiny"), "-o", tmp_path / "out", "--to", "f16", env=env)
    run("convert", TINY, "-o", tmp_path / "ref", "--to", "f16")
    assert files_of(tmp_path / "out") == files_of(tmp_path / "ref")
    # Errors: one line naming the object, non-zero exit, nothing written.
    p = run("convert", url(s3, "none/model.safetensors"), "-o", tmp_path / "x.safetensors",
            "--to", "f16", check=False)
    assert p.returncode == 1 and "none/model.safetensors" in p.stderr and "not found" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = run("convert", url(s3, "empty"), "-o", tmp_path / "x", "--to", "f16", check=False)
    assert p.returncode == 1 and "no weights here" in p.stderr
    p = run("convert", f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/m.safetensors", "-o",
            tmp_path / "x.safetensors", "--to", "f16", check=False)
    assert p.returncode == 1 and "no-such-bucket" in p.stderr
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x").exists()
    p = run("convert", TINY, "-o", "https://example.com/out", "--to", "f16", check=False)
    assert p.returncode == 2 and "object stores" in p.stderr


def test_access_denied_is_one_clear_line(tmp_path):
    """A server that checks credentials (moto with authentication on) and keys it does not
    know: 403 on reading, listing and writing, each one line that says access was denied."""
    proc, endpoint = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID="unknown", AWS_SECRET_ACCESS_KEY="unknown",
                   AWS_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint, HOME=str(tmp_path))
        for args in (["s3://private/m.safetensors", "-o", tmp_path / "x.safetensors"],
                     ["s3://private/folder", "-o", tmp_path / "x"],
                     [TINY, "-o", "s3://private/out"]):
            p = run("convert", *args, "--to", "f16", check=False, env=env)
            assert p.returncode == 1, p.stderr
            assert "access denied" in p.stderr and "403" in p.stderr, p.stderr
            assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x").exists()
    finally:
        proc.terminate()
        proc.wait(10)


class DropProxy:
    """A TCP proxy in front of the S3 server that cuts the connection in the middle of the
    first `drops` answers longer than 1 MiB (a connection dropped mid-tensor)."""

    def __init__(self, upstream_port, drops):
        import threading

        self.upstream = upstream_port
        self.drops = drops
        self.dropped = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        import threading

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self.pump, args=(client, up), daemon=True).start()
            threading.Thread(target=self.pump, args=(up, client, True), daemon=True).start()

    def pump(self, src, dst, answers=False):
        sent = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
                sent += len(data)
                if answers and sent > (1 << 20):
                    with self.lock:
                        cut = self.dropped < self.drops
                        if cut:
                            self.dropped += 1
                    if cut:
                        break
                    sent = -(1 << 62)  # this connection is spared from now on
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.sock.close()


def test_dropped_connections_are_retried(s3, tmp_path, moto, monkeypatch):
    g = torch.Generator().manual_seed(4)
    save_file({f"w{i}": torch.randn(1024, 1024, generator=g) for i in range(12)},
              tmp_path / "m.safetensors")
    s3.upload_file(str(tmp_path / "m.safetensors"), s3.bucket, "in/m.safetensors")
    run("convert", tmp_path / "m.safetensors", "-o", tmp_path / "ref.safetensors", "--to", "f16")
    proxy = DropProxy(int(moto.rsplit(":", 1)[1]), drops=2)
    try:
        env = dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}")
        run("convert", url(s3, "in/m.safetensors"), "-o", tmp_path / "o.safetensors", "--to",
            "f16", env=env)
        assert proxy.dropped == 2
        assert (tmp_path / "o.safetensors").read_bytes() == \
            (tmp_path / "ref.safetensors").read_bytes()
    finally:
        proxy.close()
