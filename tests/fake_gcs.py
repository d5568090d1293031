"""An in-memory Google Cloud Storage server for tests: the part of the GCS JSON API that
gcsfs (etils.epath's gs:// backend) and tensorstore's gcs driver (orbax's arrays) use, with
GCS's own semantics where a run depends on them: every write a new generation, reads that
name it (`x-goog-generation`), `ifGenerationMatch` / `ifGenerationNotMatch` preconditions
(412, 304), byte ranges (206), listings by prefix and delimiter with pages, multipart,
media and resumable uploads, batched deletes and rewrites.

Written from the GCS JSON API reference (cloud.google.com/storage/docs/json_api); nothing of
it is taken from an emulator. Usage:

    with FakeGCS(buckets=["b"]) as gcs:
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.url          # gcsfs
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = gcs.url       # tensorstore
"""

import base64
import dataclasses
import datetime
import hashlib
import itertools
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit


@dataclasses.dataclass
class Blob:
    data: bytes
    generation: int
    content_type: str
    updated: str
    metadata: dict


class _PreconditionError(Exception):
    def __init__(self, status: int):
        self.status = status


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client that hangs up mid-reply (gcsfs's pool at exit) is no error of the store."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class FakeGCS:
    """The server on 127.0.0.1 (a free port): `url`, `objects` {(bucket, name): Blob}."""

    def __init__(self, buckets=()):
        self.buckets = set(buckets)
        self.objects: dict[tuple[str, str], Blob] = {}
        self.lock = threading.Lock()
        self._generations = itertools.count(1_700_000_000_000_001)
        self._uploads: dict[str, dict] = {}
        self._upload_ids = itertools.count(1)
        self.server = _Server(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeGCS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the store ----------------------------------------------------------------------

    def resource(self, bucket: str, name: str, blob: Blob) -> dict:
        return {
            "kind": "storage#object", "id": f"{bucket}/{name}/{blob.generation}",
            "name": name, "bucket": bucket, "generation": str(blob.generation),
            "metageneration": "1", "contentType": blob.content_type,
            "size": str(len(blob.data)), "updated": blob.updated, "timeCreated": blob.updated,
            "md5Hash": base64.b64encode(hashlib.md5(blob.data).digest()).decode(),
            "storageClass": "STANDARD", "metadata": blob.metadata,
        }  # fmt: skip

    def check(self, bucket: str, name: str, query: dict) -> Blob | None:
        """The object, after its preconditions (raises _PreconditionError)."""
        blob = self.objects.get((bucket, name))
        generation = 0 if blob is None else blob.generation
        if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != generation:
            raise _PreconditionError(412)
        if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == generation:
            raise _PreconditionError(304)
        return blob

    def put(self, bucket: str, name: str, data: bytes, content_type: str, query: dict,
            metadata: dict | None = None) -> dict:  # fmt: skip
        with self.lock:
            self.check(bucket, name, query)
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            blob = Blob(bytes(data), next(self._generations), content_type, now, metadata or {})
            self.objects[(bucket, name)] = blob
            return self.resource(bucket, name, blob)

    def delete(self, bucket: str, name: str, query: dict) -> int:
        with self.lock:
            try:
                blob = self.check(bucket, name, query)
            except _PreconditionError as e:
                return 412 if e.status == 412 else 204
            if blob is None:
                return 404
            del self.objects[(bucket, name)]
            return 204

    def listing(self, bucket: str, query: dict) -> dict:
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        start, end = query.get("startOffset", ""), query.get("endOffset")
        after = query.get("pageToken", "")
        limit = int(query.get("maxResults", 1000))
        with self.lock:
            names = sorted(n for b, n in self.objects if b == bucket)
            entries, prefixes = [], set()
            for name in names:
                if not name.startswith(prefix) or name < start or (end and name >= end):
                    continue
                rest = name[len(prefix) :]
                if delimiter and delimiter in rest:
                    key = prefix + rest[: rest.index(delimiter) + len(delimiter)]
                    if key > after and key not in prefixes:
                        entries.append((key, None))
                        prefixes.add(key)
                elif name > after:
                    blob = self.objects[(bucket, name)]
                    entries.append((name, self.resource(bucket, name, blob)))
        entries.sort(key=lambda e: e[0])
        page, more = entries[:limit], len(entries) > limit
        out = {"kind": "storage#objects"}
        items = [r for _, r in page if r is not None]
        found = [k for k, r in page if r is None]
        if items:
            out["items"] = items
        if found:
            out["prefixes"] = found
        if more:
            out["nextPageToken"] = page[-1][0]
        return out


def _object_path(path: str) -> tuple[str, str, str] | None:
    """(bucket, object name, what follows) of /[download/]storage/v1/b/B/o/NAME[/...]."""
    m = re.fullmatch(r"(?:/download)?/storage/v1/b/([^/]+)/o/([^/]+)(/.*)?", path)
    if m is None:
        return None
    return unquote(m.group(1)), unquote(m.group(2)), m.group(3) or ""


def _handler(gcs: FakeGCS):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # Quiet.
            pass

        def _query(self) -> dict:
            return {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
                  content_type: str = "application/json") -> None:  # fmt: skip
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if body or status not in (204, 304):
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, value: dict, headers: dict | None = None) -> None:
            self._send(status, json.dumps(value).encode(), headers)

        def _error(self, status: int, message: str = "") -> None:
            self._json(status, {"error": {"code": status, "message": message or str(status)}})

        # -- reads ----------------------------------------------------------------------

        def do_GET(self):
            path, query = urlsplit(self.path).path, self._query()
            if m := re.fullmatch(r"/storage/v1/b/([^/]+)", path):
                bucket = unquote(m.group(1))
                if bucket not in gcs.buckets:
                    return self._error(404, "bucket not found")
                return self._json(200, {"kind": "storage#bucket", "name": bucket, "id": bucket})
            if m := re.fullmatch(r"/storage/v1/b/([^/]+)/o", path):
                return self._json(200, gcs.listing(unquote(m.group(1)), query))
            where = _object_path(path)
            if where is None or where[2]:
                return self._error(404, f"no route {path}")
            bucket, name, _ = where
            with gcs.lock:
                try:
                    blob = gcs.check(bucket, name, query)
                except _PreconditionError as e:
                    return self._send(e.status)
                if blob is None:
                    return self._error(404, f"{name} not found")
                headers = {
                    "x-goog-generation": str(blob.generation), "x-goog-metageneration": "1",
                    "ETag": f'"{blob.generation}"',
                }  # fmt: skip
                if query.get("alt") != "media":
                    return self._json(200, gcs.resource(bucket, name, blob), headers)
                data = blob.data
            headers["x-goog-stored-content-length"] = str(len(data))
            status, byte_range = 200, self.headers.get("Range")
            if byte_range:
                m = re.fullmatch(r"bytes=(\d*)-(\d*)", byte_range.strip())
                first, last = m.group(1), m.group(2)
                if first == "":  # The last N bytes.
                    lo, hi = max(len(data) - int(last), 0), len(data) - 1
                else:
                    lo, hi = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
                if lo >= len(data) and len(data) > 0:
                    return self._send(416, headers={"Content-Range": f"bytes */{len(data)}"})
                headers["Content-Range"] = f"bytes {lo}-{hi}/{len(data)}"
                data, status = data[lo : hi + 1], 206
            self._send(status, data, headers, "application/octet-stream")

        # -- writes ---------------------------------------------------------------------

        def do_POST(self):
            path, query = urlsplit(self.path).path, self._query()
            body = self._body()
            if path == "/batch/storage/v1":
                return self._batch(body)
            if m := re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", path):
                return self._upload(unquote(m.group(1)), query, body)
            where = _object_path(path)
            if where and (m := re.fullmatch(r"/rewriteTo/b/([^/]+)/o/([^/]+)", where[2])):
                return self._rewrite(where[0], where[1], unquote(m.group(1)), unquote(m.group(2)),
                                     query)  # fmt: skip
            self._error(404, f"no route POST {path}")

        def _upload(self, bucket: str, query: dict, body: bytes) -> None:
            if "upload_id" in query:  # A chunk of a resumable upload (gcsfs POSTs them).
                return self._chunk(query, body)
            kind = query.get("uploadType", "media")
            try:
                if kind == "media":
                    kind_type = self.headers.get("Content-Type", "application/octet-stream")
                    return self._json(200, gcs.put(bucket, query["name"], body, kind_type, query))
                if kind == "multipart":
                    meta, data, content_type = _multipart_related(self.headers, body)
                    name = meta.get("name") or query["name"]
                    return self._json(
                        200, gcs.put(bucket, name, data, content_type, query, meta.get("metadata"))
                    )
                if kind == "resumable":
                    meta = json.loads(body or b"{}")
                    upload_id = str(next(gcs._upload_ids))
                    gcs._uploads[upload_id] = dict(
                        bucket=bucket, name=meta.get("name") or query.get("name"), data=b"",
                        content_type=self.headers.get("X-Upload-Content-Type")
                        or "application/octet-stream",
                        query=query, metadata=meta.get("metadata"),
                    )  # fmt: skip
                    location = (
                        f"{gcs.url}/upload/storage/v1/b/{quote(bucket)}/o?uploadType=resumable"
                        f"&upload_id={upload_id}"
                    )
                    return self._send(200, headers={"Location": location})
            except _PreconditionError as e:
                return self._error(e.status, "precondition failed")
            self._error(400, f"uploadType {kind}")

        def do_PUT(self):
            self._chunk(self._query(), self._body())

        def _chunk(self, query: dict, body: bytes) -> None:
            upload = gcs._uploads.get(query.get("upload_id", ""))
            if upload is None:
                return self._error(404, "no such upload")
            upload["data"] += body
            m = re.fullmatch(r"bytes (\d+-\d+|\*)/(\d+|\*)", self.headers.get("Content-Range", ""))
            total = m.group(2) if m else str(len(upload["data"]))
            if total == "*":
                received = len(upload["data"])
                return self._send(308, headers={"Range": f"bytes=0-{received - 1}"})
            del gcs._uploads[query["upload_id"]]
            try:
                out = gcs.put(
                    upload["bucket"], upload["name"], upload["data"], upload["content_type"],
                    upload["query"], upload["metadata"],
                )  # fmt: skip
            except _PreconditionError as e:
                return self._error(e.status, "precondition failed")
            self._json(200, out)

        def do_DELETE(self):
            where = _object_path(urlsplit(self.path).path)
            if where is None or where[2]:
                return self._error(404, "no route")
            status = gcs.delete(where[0], where[1], self._query())
            if status == 204:
                return self._send(204)
            self._error(status)

        def _rewrite(self, bucket, name, to_bucket, to_name, query) -> None:
            with gcs.lock:
                blob = gcs.objects.get((bucket, name))
            if blob is None:
                return self._error(404, f"{name} not found")
            # The destination's preconditions (ifSource... name the source's).
            dst = {k: query[k] for k in ("ifGenerationMatch", "ifGenerationNotMatch") if k in query}
            try:
                out = gcs.put(to_bucket, to_name, blob.data, blob.content_type, dst, blob.metadata)
            except _PreconditionError as e:
                return self._error(e.status, "precondition failed")
            size = str(len(blob.data))
            self._json(200, {"kind": "storage#rewriteResponse", "done": True, "resource": out,
                             "totalBytesRewritten": size, "objectSize": size})  # fmt: skip

        def _batch(self, body: bytes) -> None:
            """A multipart/mixed batch of DELETEs (gcsfs's rm of many objects)."""
            boundary = _boundary(self.headers["Content-Type"])
            answers = []
            for part in body.split(b"--" + boundary.encode())[1:]:
                text = part.decode("utf-8", "replace")
                m = re.search(r"^(DELETE|GET) (\S+) HTTP/1\.1", text, re.MULTILINE)
                if m is None:
                    continue
                content_id = re.search(r"Content-ID: <([^>]*)>", text)
                target = urlsplit(m.group(2))
                where = _object_path(target.path)
                query = {k: v[-1] for k, v in parse_qs(target.query).items()}
                status = 404 if where is None else gcs.delete(where[0], where[1], query)
                reason = {204: "No Content", 404: "Not Found", 412: "Precondition Failed"}[status]
                cid = f"Content-ID: <response-{content_id.group(1)}>\r\n" if content_id else ""
                answers.append(
                    f"Content-Type: application/http\r\n{cid}\r\nHTTP/1.1 {status} {reason}\r\n"
                    "Content-Length: 0\r\n\r\n"
                )
            mark = "batch_medjax_fake_gcs"
            payload = "".join(f"--{mark}\r\n{a}" for a in answers) + f"--{mark}--"
            self._send(200, payload.encode(), content_type=f"multipart/mixed; boundary={mark}")

    return Handler


def _boundary(content_type: str) -> str:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    return m.group(1)


def _multipart_related(headers, body: bytes) -> tuple[dict, bytes, str]:
    """(JSON metadata, data, data's content type) of a multipart/related upload, bytes for
    bytes (gcsfs ends its lines with LF, the standard with CRLF)."""
    delimiter = b"--" + _boundary(headers["Content-Type"]).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk[1:]  # The boundary's EOL.
        cut = min(i for i in (chunk.find(b"\r\n\r\n"), chunk.find(b"\n\n")) if i >= 0)
        head, data = chunk[:cut], chunk[cut:]
        data = data[4:] if data.startswith(b"\r\n\r\n") else data[2:]
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
        m = re.search(rb"content-type:\s*([^\r\n;]+)", head, re.IGNORECASE)
        parts.append((m.group(1).decode().strip() if m else "application/octet-stream", data))
    meta = json.loads(parts[0][1] or b"{}")
    return meta, parts[1][1], parts[1][0]
