"""A small HTTP matching service: enrol, verify, identify and erase over JSON.

Who it is for: a developer putting biotemplate behind a network API. It uses only the
standard library (``http.server.ThreadingHTTPServer``: one thread per request) and one
``TemplateStore`` shared by every thread, which is safe: the store serialises mutations
with its own lock and runs searches concurrently under the index's read lock
(docs/architecture.md, "Concurrency"). One process per SQLite store: the store's writer
lock refuses a second process, so scale with threads here, or with the PostgreSQL
backend for several workers.

Endpoints (POST, JSON body; the caller's identity in ``X-Actor``, which a real service
takes from its authentication, never from the client's say-so; a reason in ``X-Reason``):

=============  ===================================  =======================================
path           body                                 answer
=============  ===================================  =======================================
/enrol         subject_id, template (list), ttl_s   201 record_id
/verify        subject_id, probe                    match, score, threshold
/identify      probe, k (optional)                  decision, candidates (open set)
/erase         subject_id                           records_erased, key_destroyed
=============  ===================================  =======================================

Errors map to status codes: bad input 400, refused by the policy 403, not found 404,
anything else 500 with no detail. Messages never repeat a subject id or a template, and
the request log names the method, path and status only (the bodies hold the personal
data). Templates travel as JSON lists of floats, which is simple but bulky; a production
service would also put TLS and authentication in front.

``python examples/matching_service.py`` runs a demo: a temporary store, the service on
a free port, 16 client threads enrolling, verifying and identifying at once, then an
erasure. ``--store DIR --key-file K [--port 8080]`` serves an existing store instead.
The thresholds come from the store's policy; the demo's (0.55, 0.60) suit its synthetic
data only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

import biotemplate as bt
from biotemplate.synthetic import make_gallery, non_mated, probes

ENROL_PURPOSES = ["access"]
VERIFY_PURPOSE = "access"
IDENTIFY_PURPOSE = "access"
MAX_BODY = 1 << 20  # bytes: a 512-d template as JSON is ~10 KB
STATUS = {bt.InvalidInput: 400, bt.InvalidPolicy: 400, bt.PolicyViolation: 403,
          bt.RecordNotFound: 404}


class Service(ThreadingHTTPServer):
    """The HTTP server and the one store its request threads share."""

    daemon_threads = True
    request_queue_size = 128  # socketserver's default (5) resets bursts of connections

    def __init__(self, address: tuple[str, int], store: bt.TemplateStore, *,
                 verbose: bool = False) -> None:
        super().__init__(address, Handler)
        self.store = store
        self.verbose = verbose  # log one line per request: method, path, status


class Handler(BaseHTTPRequestHandler):
    server: Service

    def do_POST(self) -> None:
        routes = {"/enrol": self.enrol, "/verify": self.verify, "/identify": self.identify,
                  "/erase": self.erase}
        route = routes.get(self.path)
        if route is None:
            return self.reply(404, {"error": "no such endpoint"})
        actor = self.headers.get("X-Actor", "")
        try:
            body = self.body()
            status, answer = route(body, actor, self.headers.get("X-Reason"))
        except bt.BiotemplateError as exc:
            status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)),
                          500)
            message = str(exc) if status != 500 else "the store could not answer"
            return self.reply(status, {"error": type(exc).__name__, "message": message})
        except (ValueError, TypeError, KeyError):
            return self.reply(400, {"error": "malformed request"})
        return self.reply(status, answer)

    def body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length", "0"))
        if not 0 < length <= MAX_BODY:
            raise ValueError("body missing or too large")
        data = json.loads(self.rfile.read(length))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data

    # --- the four endpoints: each one library call -------------------------------------

    def enrol(self, b: dict[str, Any], actor: str, reason: str | None,
              ) -> tuple[int, dict[str, Any]]:
        ttl = timedelta(seconds=int(b["ttl_s"])) if "ttl_s" in b else None
        rid = self.server.store.enroll(_vector(b["template"]), subject_id=b["subject_id"],
                                       purposes=ENROL_PURPOSES, ttl=ttl, actor=actor)
        return 201, {"record_id": rid}

    def verify(self, b: dict[str, Any], actor: str, reason: str | None,
               ) -> tuple[int, dict[str, Any]]:
        v = self.server.store.verify(_vector(b["probe"]), subject_id=b["subject_id"],
                                     purpose=VERIFY_PURPOSE, actor=actor, reason=reason)
        return 200, {"match": v.match, "score": round(v.score, 4), "threshold": v.threshold}

    def identify(self, b: dict[str, Any], actor: str, reason: str | None,
                 ) -> tuple[int, dict[str, Any]]:
        res = self.server.store.search(_vector(b["probe"]), purpose=IDENTIFY_PURPOSE,
                                       k=int(b.get("k", 5)), actor=actor, reason=reason)
        return 200, {"decision": res.decision, "audit_seq": res.audit_seq,
                     "candidates": [{"subject_id": c.subject_id, "score": round(c.score, 4),
                                     "record_id": c.record_id} for c in res.candidates]}

    def erase(self, b: dict[str, Any], actor: str, reason: str | None,
              ) -> tuple[int, dict[str, Any]]:
        r = self.server.store.erase_subject(b["subject_id"], actor=actor, reason=reason)
        return 200, {"records_erased": r.records_erased, "key_destroyed": r.key_destroyed,
                     "audit_seq": r.audit_seq}

    # --- plumbing ----------------------------------------------------------------------

    def reply(self, status: int, answer: dict[str, Any]) -> None:
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: http.server's own lines may quote a malformed request."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if self.server.verbose:
            sys.stderr.write(f"{self.command} {self.path} {code}\n")


def _vector(value: Any) -> np.ndarray[Any, Any]:
    """A JSON list of numbers as float32; the store checks its length and values."""
    if not isinstance(value, list):
        raise ValueError("a template is a list of numbers")
    return np.asarray(value, dtype=np.float32)


def serve(store: bt.TemplateStore, host: str = "127.0.0.1", port: int = 0,
          *, verbose: bool = False) -> Service:
    """Start the service in a background thread; ``port=0`` takes a free port
    (``service.server_address`` says which). Stop it with ``service.shutdown()``."""
    service = Service((host, port), store, verbose=verbose)
    threading.Thread(target=service.serve_forever, name="matching-service",
                     daemon=True).start()
    return service


def call(base: str, path: str, body: dict[str, Any], actor: str = "demo-client",
         ) -> tuple[int, dict[str, Any]]:
    """A client request; returns (status, answer) for errors too."""
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "X-Actor": actor, "X-Reason": "demo"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def demo(work: Path) -> None:
    policy = bt.RetentionPolicy.from_dict({"epoch": "1d", "purposes": {"access": {
        "max_retention": "90d", "default_retention": "30d",
        "modes": ["verification", "identification"], "match_threshold": 0.55}}})
    keys = bt.FileKeyProvider.generate(work / "master.key")
    people = make_gallery(48, 1, 128, seed=41, prefix="S-")
    with bt.TemplateStore.create(work / "store", dim=128, model="faces-v3", policy=policy,
                                 key_provider=keys) as store:
        service = serve(store)
        base = f"http://127.0.0.1:{service.server_address[1]}"
        try:
            with ThreadPoolExecutor(max_workers=16) as pool:
                enrolled = list(pool.map(
                    lambda i: call(base, "/enrol", {
                        "subject_id": people.subject_ids[i],
                        "template": people.templates[i].tolist()}),
                    range(48)))
                assert all(status == 201 for status, _ in enrolled), enrolled[:3]
                fresh = probes(people, list(range(48)), seed=7)
                found = list(pool.map(
                    lambda i: call(base, "/identify", {"probe": fresh[i].tolist()}),
                    range(48)))
                checked = list(pool.map(
                    lambda i: call(base, "/verify", {"subject_id": people.subject_ids[i],
                                                     "probe": fresh[i].tolist()}),
                    range(48)))
            hits = sum(bool(a["candidates"])
                       and a["candidates"][0]["subject_id"] == people.subject_ids[i]
                       for i, (_, a) in enumerate(found))
            print(f"48 concurrent enrolments, identifications and verifications: "
                  f"{hits}/48 identified as themselves, "
                  f"{sum(a['match'] for _, a in checked)}/48 verified")
            stranger = non_mated(people, 1, seed=8)[0].tolist()
            print("a stranger:", call(base, "/identify", {"probe": stranger})[1])
            print("erase S-000003:", call(base, "/erase", {"subject_id": "S-000003"})[1])
            print("verify S-000003 now:", call(base, "/verify", {
                "subject_id": "S-000003", "probe": fresh[3].tolist()}))
            print("a bad template:", call(base, "/enrol", {"subject_id": "S-1",
                                                           "template": [1.0, 2.0]}))
            print("no actor:", call(base, "/identify", {"probe": stranger}, actor=""))
            assert store.stats().records == 47 and store.audit.verify().ok
        finally:
            service.shutdown()
            service.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a small HTTP matching service")
    parser.add_argument("--store", help="serve this existing store (default: a demo)")
    parser.add_argument("--key-file", help="its master key file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    if not args.store:
        work = Path(tempfile.mkdtemp(prefix="biotemplate-service-"))
        try:
            demo(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    if not args.key_file:
        parser.error("--store needs --key-file")
    with bt.TemplateStore.open(args.store, key_provider=bt.FileKeyProvider(args.key_file),
                               ) as store:
        service = serve(store, args.host, args.port, verbose=True)
        print(f"serving {args.store} on http://{args.host}:{service.server_address[1]}")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            service.shutdown()


if __name__ == "__main__":
    main()
