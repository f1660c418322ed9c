"""Remote inputs: `convert https://.../model.safetensors` (here plain HTTP on loopback, served by
a real threaded HTTP server with range support started by the test) reads the header, then
each tensor's bytes, by range requests. Faults: a connection dropped mid-tensor, a short body,
a 5xx (retried: the output is identical), a 404, a 403 without token, a file that changes
mid-read, a server without ranges: each a clear error or a correct output, never a partial one."""

import http.server
import socket
import threading

import pytest
import torch
from safetensors.torch import save_file

from conftest import run


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = {}  # path -> bytes
        self.etags = {}  # path -> etag
        self.faults = {}  # path -> [(after_n_requests, action)]
        self.counts = {}  # path -> requests served
        self.token = None  # path prefix -> token required
        self.ranges = True
        # The "hold" fault: the request waits for `release` (set by the test) after `held`.
        self.held = threading.Event()
        self.release = threading.Event()
        self.on_hold = None  # called (in the server's thread) when a hold begins

    def handle_error(self, request, client_address):
        # The fault injections drop connections on purpose: not worth a traceback.
        pass

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        s = self.server
        path = self.path.split("?")[0]
        if path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", path[len("/redirect"):])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path.startswith("/gated/") and self.headers.get("Authorization") != f"Bearer {s.token}":
            return self.fail(403)
        if path not in s.files:
            return self.fail(404)
        n = s.counts.get(path, 0)
        s.counts[path] = n + 1
        action = None
        for i, (after, what) in enumerate(s.faults.get(path, [])):
            if n >= after:
                action = what
                s.faults[path].pop(i)
                break
        if action == "500":
            return self.fail(500)
        if action == "hold":
            s.held.set()
            if s.on_hold is not None:
                s.on_hold()
            s.release.wait(120)
        if action == "etag":
            s.etags[path] = s.etags[path] + "-changed"
        data = s.files[path]
        rng = self.headers.get("Range")
        if not rng or not s.ranges:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", s.etags[path])
            self.end_headers()
            self.wfile.write(data)
            return
        a, b = rng.split("=")[1].split("-")
        a, b = int(a), min(int(b), len(data) - 1)
        body = data[a:b + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
        if action == "short":
            # A complete, well-formed answer whose body is shorter than the range it claims:
            # the connection stays up; the reader sees the body end early.
            self.send_header("Content-Length", str(len(body) // 2))
            self.send_header("ETag", s.etags[path])
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            return
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", s.etags[path])
        self.end_headers()
        if action == "drop":
            # Half the body, then the connection goes away mid-tensor.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def fail(self, code):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture()
def server(tmp_path):
    s = Server()
    t = threading.Thread(target=s.serve_forever, daemon=True)
    t.start()
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}.weight": torch.randn(512, 1024, generator=g) for i in range(12)}
    tensors["steps"] = torch.arange(10)
    local = tmp_path / "model.safetensors"
    save_file(tensors, local, metadata={"format": "pt"})
    for p in ("/org/model.safetensors", "/gated/model.safetensors"):
        s.files[p] = local.read_bytes()
        s.etags[p] = '"v1"'
    s.local = local
    yield s
    s.shutdown()


def reference(server, tmp_path, *opts):
    out = tmp_path / "ref.safetensors"
    run("convert", server.local, "-o", out, "--to", "f16", *opts)
    return out.read_bytes()


def test_remote_equals_local(server, tmp_path):
    ref = reference(server, tmp_path)
    for url in (f"{server.url}/org/model.safetensors", f"{server.url}/redirect/org/model.safetensors"):
        out = tmp_path / "o.safetensors"
        run("convert", url, "-o", out, "--to", "f16", "--force")
        assert out.read_bytes() == ref, url
    # 12 tensors of 2 MiB: read by ranges (chunks), never in one response.
    assert server.counts["/org/model.safetensors"] > 12
    p = run("inspect", f"{server.url}/org/model.safetensors")
    assert "layer.11.weight" in p.stdout


@pytest.mark.parametrize("fault", ["drop", "short", "500"])
def test_faults_are_retried_and_the_output_is_identical(server, tmp_path, fault):
    ref = reference(server, tmp_path)
    server.faults["/org/model.safetensors"] = [(5, fault), (9, fault)]
    out = tmp_path / "o.safetensors"
    run("convert", f"{server.url}/org/model.safetensors", "-o", out, "--to", "f16")
    assert out.read_bytes() == ref
    assert not server.faults["/org/model.safetensors"], "both faults were served"


def test_errors_leave_no_output(server, tmp_path):
    out = tmp_path / "o.safetensors"
    p = run("convert", f"{server.url}/org/missing.safetensors", "-o", out, "--to", "f16",
            check=False)
    assert p.returncode == 1 and "missing.safetensors: HTTP 404" in p.stderr
    p = run("convert", f"{server.url}/gated/model.safetensors", "-o", out, "--to", "f16",
            check=False)
    assert p.returncode == 1 and "HTTP 403" in p.stderr and "HF_TOKEN" in p.stderr
    server.token = "secret"
    import os

    env = dict(os.environ, HF_TOKEN="secret")
    run("convert", f"{server.url}/gated/model.safetensors", "-o", out, "--to", "f16", env=env)
    assert out.read_bytes() == reference(server, tmp_path)
    out.unlink()
    # The file changes on the server mid-read: an error, not a mixed output.
    server.faults["/org/model.safetensors"] = [(6, "etag")]
    p = run("convert", f"{server.url}/org/model.safetensors", "-o", out, "--to", "f16",
            check=False)
    assert p.returncode == 1 and "changed on the server" in p.stderr
    assert not out.exists()
    # Five failures in a row: given up with the reason, nothing written.
    server.faults["/org/model.safetensors"] = [(0, "500")] * 5
    p = run("convert", f"{server.url}/org/model.safetensors", "-o", out, "--to", "f16",
            check=False)
    assert p.returncode == 1 and "HTTP 500" in p.stderr and "attempts" in p.stderr
    assert not out.exists()
    server.ranges = False
    server.faults.clear()
    p = run("convert", f"{server.url}/org/model.safetensors", "-o", out, "--to", "f16",
            check=False)
    assert p.returncode == 1 and "ignores range requests" in p.stderr
    assert not out.exists() and not list(tmp_path.glob(".o.safetensors*"))


# ---------------------------------------------------------------------------------------------
# hf://ORG/NAME[@REVISION]: a Hub-shaped tree served through HF_ENDPOINT, and the local cache


TINY = __import__("conftest").ROOT / "examples" / "tiny-bert"


def serve_repo(server, repo, rev, folder):
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for p in files:
        rel = p.relative_to(folder).as_posix()
        key = f"/{repo}/resolve/{rev}/{rel}"
        server.files[key] = p.read_bytes()
        server.etags[key] = f'"{rel}-1"'
    listing = {"id": repo, "sha": "0" * 40,
               "siblings": [{"rfilename": p.relative_to(folder).as_posix()} for p in files]}
    key = f"/api/models/{repo}/revision/{rev}"
    server.files[key] = __import__("json").dumps(listing).encode()
    server.etags[key] = '"list"'


def files_of(d):
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def test_hf_repo_single_and_sharded(server, tmp_path, minilm):
    import os

    sharded = tmp_path / "sharded-src"
    run("convert", minilm, "-o", sharded, "--to", "f32", "--max-shard-size", "20MB")
    serve_repo(server, "org/tiny", "main", TINY)
    serve_repo(server, "org/sharded", "v1", sharded)
    env = dict(os.environ, HF_ENDPOINT=server.url, HF_HUB_CACHE=str(tmp_path / "no-cache"))
    for spec, local in (("hf://org/tiny", TINY), ("hf://org/sharded@v1", sharded)):
        out, ref = tmp_path / f"out-{local.name}", tmp_path / f"ref-{local.name}"
        run("convert", spec, "-o", out, "--to", "f16", "--preset", "keep-norms", env=env)
        run("convert", local, "-o", ref, "--to", "f16", "--preset", "keep-norms")
        assert files_of(out) == files_of(ref), spec
    # Weights were read by ranges, never whole.
    shard = "/org/sharded/resolve/v1/model-00001-of-00005.safetensors"
    assert server.counts.get(shard, 0) > 2
    p = run("convert", "hf://org/missing", "-o", tmp_path / "x", "--to", "f16", check=False,
            env=env)
    assert p.returncode == 1 and "404" in p.stderr and not (tmp_path / "x").exists()
    p = run("convert", "hf://org/../etc", "-o", tmp_path / "x", "--to", "f16", check=False,
            env=env)
    assert p.returncode == 2 and "hf://ORG/NAME" in p.stderr


def test_hf_repo_from_the_local_cache(tmp_path):
    import os
    import shutil

    hub = tmp_path / "hub"
    root = hub / "models--org--cached"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("abc123")
    shutil.copytree(TINY, root / "snapshots" / "abc123")
    # No server at all: the cache answers.
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(hub))
    p = run("convert", "hf://org/cached", "-o", tmp_path / "out", "--to", "f16", env=env)
    assert "local Hugging Face cache" in p.stderr
    run("convert", TINY, "-o", tmp_path / "ref", "--to", "f16")
    assert files_of(tmp_path / "out") == files_of(tmp_path / "ref")


def test_hf_repo_of_pytorch_bin_files(server, tmp_path):
    """A repository whose weights are `pytorch_model.bin` (one file, or an index and shards):
    fetched into a temporary folder (the archive reader needs each zip's directory) and
    converted exactly as the same folder on disk."""
    import json
    import os
    import shutil

    g = torch.Generator().manual_seed(3)
    sd = {f"layer.{i}.weight": torch.randn(64, 32, generator=g) for i in range(4)}
    sd["layer.0.steps"] = torch.arange(5)
    single = tmp_path / "bin-single"
    single.mkdir()
    shutil.copy(TINY / "config.json", single / "config.json")
    torch.save(sd, single / "pytorch_model.bin")
    sharded = tmp_path / "bin-sharded"
    sharded.mkdir()
    shutil.copy(TINY / "config.json", sharded / "config.json")
    names = sorted(sd)
    weight_map = {}
    for k, part in enumerate((names[:2], names[2:])):
        shard = f"pytorch_model-0000{k + 1}-of-00002.bin"
        torch.save({n: sd[n] for n in part}, sharded / shard)
        weight_map.update({n: shard for n in part})
    (sharded / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    serve_repo(server, "org/bin", "main", single)
    serve_repo(server, "org/binshards", "main", sharded)
    env = dict(os.environ, HF_ENDPOINT=server.url, HF_HUB_CACHE=str(tmp_path / "no-cache"))
    for spec, local in (("hf://org/bin", single), ("hf://org/binshards", sharded)):
        out, ref = tmp_path / f"out-{local.name}", tmp_path / f"ref-{local.name}"
        p = run("convert", spec, "-o", out, "--to", "f16", env=env)
        assert "local copy" in p.stderr, p.stderr
        run("convert", local, "-o", ref, "--to", "f16")
        assert files_of(out) == files_of(ref), spec
        from safetensors.torch import load_file

        got = load_file(out / "model.safetensors") if (out / "model.safetensors").exists() \
            else {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
        assert set(got) == set(sd)
        for k, v in sd.items():
            assert torch.equal(got[k], v.half() if v.is_floating_point() else v), k


def test_a_file_replaced_after_its_last_range_is_caught_before_the_commit(server, tmp_path):
    """The per-range checks cannot see a replacement after the last range was read: the
    reader asks once more before the output is committed. The replacement is made to happen
    exactly then: a clean run's request count gives the index of that last request."""
    path = "/org/model.safetensors"
    ok = tmp_path / "ok.safetensors"
    server.counts.clear()
    run("convert", f"{server.url}{path}", "-o", ok, "--to", "f16")
    last = server.counts[path] - 1
    server.counts.clear()
    server.faults[path] = [(last, "etag")]
    out = tmp_path / "o.safetensors"
    p = run("convert", f"{server.url}{path}", "-o", out, "--to", "f16", check=False)
    assert not server.faults[path], "the replacement came with the last request"
    assert p.returncode == 1 and "checked after the last range" in p.stderr, p.stderr
    assert not out.exists() and not list(tmp_path.glob(".o.safetensors*"))
