"""tests/fake_gcs.py against GCS's documented behaviour, through plain HTTP and gcsfs: the
remote run-directory test is only as strict as this server. Catches a fake that accepts a
write whose precondition fails (orbax's OCDBT manifests rely on it), answers a conditional
read with the data, loses bytes in a multipart upload, or lists prefixes wrongly."""

import json
import os
import urllib.error
import urllib.request

import pytest

from tests.fake_gcs import FakeGCS

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
gcsfs = pytest.importorskip("gcsfs")


@pytest.fixture
def gcs():
    with FakeGCS(buckets=["b"]) as server:
        yield server


def call(gcs, method, path, data=None, headers=None):
    url = gcs.url + path
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_generations_and_preconditions(gcs):
    upload = "/upload/storage/v1/b/b/o?uploadType=media&name=a%2Fx"
    status, _, body = call(gcs, "POST", upload + "&ifGenerationMatch=0", b"one")
    assert status == 200
    first = int(json.loads(body)["generation"])
    # Create-only fails once the object exists; a write naming the current generation passes.
    assert call(gcs, "POST", upload + "&ifGenerationMatch=0", b"two")[0] == 412
    assert call(gcs, "POST", upload + f"&ifGenerationMatch={first + 1}", b"two")[0] == 412
    status, _, body = call(gcs, "POST", upload + f"&ifGenerationMatch={first}", b"two")
    second = int(json.loads(body)["generation"])
    assert status == 200 and second > first
    media = "/storage/v1/b/b/o/a%2Fx?alt=media"
    status, headers, body = call(gcs, "GET", media)
    assert (status, body, headers["x-goog-generation"]) == (200, b"two", str(second))
    assert call(gcs, "GET", media + f"&ifGenerationNotMatch={second}")[0] == 304
    assert call(gcs, "GET", media + f"&ifGenerationNotMatch={first}")[2] == b"two"
    status, headers, body = call(gcs, "GET", media, headers={"Range": "bytes=1-"})
    assert (status, body, headers["Content-Range"]) == (206, b"wo", "bytes 1-2/3")
    assert call(gcs, "DELETE", f"/storage/v1/b/b/o/a%2Fx?ifGenerationMatch={first}")[0] == 412
    assert call(gcs, "DELETE", "/storage/v1/b/b/o/a%2Fx")[0] == 204
    assert call(gcs, "GET", media)[0] == 404


def test_gcsfs_round_trips_binary_lists_and_removes(gcs, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
    fs = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)
    blob = bytes(range(256)) * 3 + b"\r\n\n"  # Line ends last: none may be taken as framing.
    fs.pipe_file("b/run/d/x.bin", blob)
    fs.pipe_file("b/run/d/e/y.txt", b"y")
    fs.pipe_file("b/run/z.txt", b"z")
    assert fs.cat("b/run/d/x.bin") == blob
    assert sorted(fs.ls("b/run", detail=False)) == ["b/run/d", "b/run/z.txt"]
    assert sorted(fs.find("b/run")) == ["b/run/d/e/y.txt", "b/run/d/x.bin", "b/run/z.txt"]
    fs.rm("b/run/d", recursive=True)  # A batched delete.
    fs.invalidate_cache()
    assert fs.find("b/run") == ["b/run/z.txt"]
    assert sorted(n for _, n in gcs.objects) == ["run/z.txt"]


def test_listing_pages_and_prefixes(gcs):
    for name in ("p/a", "p/b/1", "p/b/2", "p/c", "q"):
        call(gcs, "POST", f"/upload/storage/v1/b/b/o?uploadType=media&name={name}", b".")
    _, _, body = call(gcs, "GET", "/storage/v1/b/b/o?prefix=p/&delimiter=/&maxResults=2")
    page = json.loads(body)
    assert [i["name"] for i in page["items"]] == ["p/a"] and page["prefixes"] == ["p/b/"]
    token = page["nextPageToken"]
    _, _, body = call(gcs, "GET", f"/storage/v1/b/b/o?prefix=p/&delimiter=/&pageToken={token}")
    rest = json.loads(body)
    assert [i["name"] for i in rest["items"]] == ["p/c"] and "prefixes" not in rest
