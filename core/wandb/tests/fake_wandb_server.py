#!/usr/bin/env python3
"""Loopback stand-in for the W&B backend, for sipt-wandb's end-to-end tests.

It serves just enough of the API for `wandb sync` (wandb-core) to upload a run:
  POST /graphql                              GraphQL, answered by operation name
  POST /files/<entity>/<project>/<run>/file_stream   history/summary/complete
  PUT  /upload/...                           file uploads (URLs handed out by CreateRunFiles)
and keeps what arrives per run.  GET /_test/state returns that state as JSON.

Usage: fake_wandb_server.py [--max-seconds N]
Binds 127.0.0.1 on a free port and prints "PORT <n>" on stdout.  It exits when its
stdin reaches end-of-file (the test that started it ended or dropped it) or after
--max-seconds, whichever comes first.
"""
import argparse
import gzip
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
STATE = {"operations": [], "unknown": [], "uploads": [], "otel_posts": 0, "runs": {}}


def run_entry(entity, project, name):
    key = f"{entity}/{project}/{name}"
    runs = STATE["runs"]
    if key not in runs:
        runs[key] = {
            "entity": entity,
            "project": project,
            "name": name,
            "upserts": 0,
            "config": None,
            "tags": None,
            "display_name": None,
            "history": [],
            "summary": None,
            "events": 0,
            "complete": None,
            "exitcode": None,
            "file_stream_posts": 0,
        }
    return runs[key]


def find_run(entity, project, name):
    return STATE["runs"].get(f"{entity}/{project}/{name}")


def bucket_json(run):
    """The run as the GraphQL `Run` (bucket) fields that wandb-core asks for."""
    internal = ((run["config"] or {}).get("_wandb") or {}).get("value") or {}
    # wandbConfig(keys: ["t"]): wandb-core treats a run as started only when "t" is there.
    wandb_config = {"t": internal["t"]} if "t" in internal else {}
    return {
        "id": "UnVuOnYx" + run["name"],
        "name": run["name"],
        "displayName": run["display_name"],
        "description": "",
        "notes": None,
        "config": json.dumps(run["config"] or {}),
        "summaryMetrics": json.dumps(run["summary"] or {}),
        "sweepName": None,
        "tags": run["tags"] or [],
        "historyLineCount": len(run["history"]),
        "historyTail": json.dumps([json.dumps(r) for r in run["history"][-1:]]),
        "eventsLineCount": run["events"],
        "eventsTail": "[]",
        "logLineCount": 0,
        "wandbConfig": json.dumps(wandb_config),
        "project": {
            "id": "UHJvamVjdDox",
            "name": run["project"],
            "entity": {"id": "RW50aXR5OjE=", "name": run["entity"]},
        },
    }


def graphql(handler, body):
    query = body.get("query", "")
    variables = body.get("variables") or {}
    op = body.get("operationName")
    if not op:
        m = re.search(r"\b(?:query|mutation)\s+(\w+)", query)
        op = m.group(1) if m else "?"
    with LOCK:
        STATE["operations"].append(op)
        entity = variables.get("entity") or "sipt-test"
        project = variables.get("project") or "uncategorized"
        if op == "Viewer":
            data = {"viewer": {
                "id": "VXNlcjox", "entity": "sipt-test", "username": "sipt-test",
                "email": "sipt-test@localhost", "flags": "{}",
                "teams": {"edges": []},
            }}
        elif op == "ServerFeaturesQuery":
            data = {"serverInfo": {"features": []}}
        elif op == "RunResumeStatus":
            run = find_run(entity, project, variables.get("name"))
            data = {"model": {
                "id": "UHJvamVjdDox", "name": project,
                "entity": {"id": "RW50aXR5OjE=", "name": entity},
                "bucket": bucket_json(run) if run else None,
            }}
        elif op == "UpsertBucket":
            name = variables.get("name") or variables.get("id")
            run = run_entry(entity, project, name)
            inserted = run["upserts"] == 0
            run["upserts"] += 1
            if variables.get("config") is not None:
                run["config"] = json.loads(variables["config"])
            if variables.get("tags") is not None:
                run["tags"] = variables["tags"]
            if variables.get("displayName") is not None:
                run["display_name"] = variables["displayName"]
            if variables.get("summaryMetrics") is not None:
                run["summary"] = json.loads(variables["summaryMetrics"])
            data = {"upsertBucket": {"bucket": bucket_json(run), "inserted": inserted}}
        elif op == "CreateRunFiles":
            base = f"http://127.0.0.1:{handler.server.server_port}/upload"
            run_path = f"{variables.get('entity')}/{variables.get('project')}/{variables.get('run')}"
            data = {"createRunFiles": {
                "runID": "UnVuOnYx" + str(variables.get("run")),
                "uploadHeaders": [],
                "files": [{"name": f, "uploadUrl": f"{base}/{run_path}/{f}"}
                          for f in variables.get("files", [])],
            }}
        else:
            STATE["unknown"].append({"op": op, "variables": variables})
            data = {}
    return {"data": data}


def load_line(line):
    """Parses a history/summary line, keeping NaN and the infinities as strings so that
    the state stays strict JSON."""
    return json.loads(line, parse_constant=str)


def file_stream(entity, project, name, body):
    with LOCK:
        run = run_entry(entity, project, name)
        run["file_stream_posts"] += 1
        for fname, chunk in (body.get("files") or {}).items():
            offset = chunk.get("offset", 0)
            lines = chunk.get("content") or []
            if fname == "wandb-history.jsonl":
                rows = [load_line(line) for line in lines]
                run["history"][offset:offset + len(rows)] = rows
            elif fname == "wandb-summary.json":
                if lines:
                    run["summary"] = load_line(lines[-1])
            elif fname == "wandb-events.jsonl":
                run["events"] = max(run["events"], offset + len(lines))
        if "complete" in body and body["complete"] is not None:
            run["complete"] = body["complete"]
        if "exitcode" in body and body["exitcode"] is not None:
            run["exitcode"] = body["exitcode"]
    return {"exitcode": None, "limits": {}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # keep the test output quiet
        pass

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            raw = gzip.decompress(raw)
        return raw

    def reply(self, code, obj):
        payload = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self):
        raw = self.read_body()
        path = self.path.split("?", 1)[0]
        if path == "/graphql":
            self.reply(200, graphql(self, json.loads(raw or b"{}")))
            return
        m = re.fullmatch(r"/files/([^/]+)/([^/]+)/([^/]+)/file_stream", path)
        if m:
            self.reply(200, file_stream(*m.groups(), json.loads(raw or b"{}")))
            return
        if path.startswith("/sdk/otel/"):  # wandb-core's own OpenTelemetry metrics
            with LOCK:
                STATE["otel_posts"] += 1
            self.reply(200, {})
            return
        with LOCK:
            STATE["unknown"].append({"method": "POST", "path": self.path})
        self.reply(404, {"error": "not found"})

    def do_PUT(self):
        raw = self.read_body()
        with LOCK:
            STATE["uploads"].append({"path": self.path.split("?", 1)[0], "size": len(raw)})
        self.reply(200, {})

    def do_GET(self):
        if self.path == "/_test/state":
            with LOCK:
                self.reply(200, STATE)
            return
        with LOCK:
            STATE["unknown"].append({"method": "GET", "path": self.path})
        self.reply(404, {"error": "not found"})


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client closing a kept-alive connection is normal; report anything else.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args()
    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"PORT {server.server_port}", flush=True)

    def wait_for_stdin_eof():
        while sys.stdin.buffer.read(4096):
            pass

    watcher = threading.Thread(target=wait_for_stdin_eof, daemon=True)
    watcher.start()
    watcher.join(timeout=args.max_seconds)
    server.shutdown()


if __name__ == "__main__":
    main()
