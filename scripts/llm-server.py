#!/usr/bin/env python3
"""Serve SmolLM2-135M-Instruct (or another GGUF) over an OpenAI-compatible HTTP API on loopback.

Used by the LLM judge and rewriter tests, and handy for trying the LLM plugins locally. It runs
llama.cpp's own server in-process through PyPI `xllamacpp` (pip install xllamacpp==2026.10.11549)
and serves /v1/chat/completions, /v1/completions (with logprobs), /v1/models, /health and
/metrics.

    scripts/llm-server.py [--port N] [--model PATH] [--parallel N] [--threads N] [--ctx N]

Once /health answers OK it prints one line, `SIPT_LLM_SERVER_URL=http://127.0.0.1:PORT/v1`, and
stays up until killed (SIGTERM / SIGINT), or, with --exit-on-stdin-eof, until its standard input
closes (so a test that dies cannot leave it running). Port 0 picks a free port. The model
defaults to $SIPT_ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-assets.sh
smollm2), the assets folder found as the engine finds it ($SIPT_ASSETS, else $SIPT_CACHE/assets,
else $XDG_CACHE_HOME/sipt/assets, else ~/.cache/sipt/assets). Exit status 2: bad arguments or a
missing model or package; 3: the server did not become healthy in time.
"""

import argparse
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

MODEL_REL = os.path.join("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def fail(code, message):
    print(f"llm-server: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def assets_dir():
    """The rule of the engine and scripts/fetch-assets.sh: $SIPT_ASSETS, else <cache root>/assets,
    the cache root being $SIPT_CACHE, else $XDG_CACHE_HOME/sipt, else ~/.cache/sipt."""
    if os.environ.get("SIPT_ASSETS"):
        return os.environ["SIPT_ASSETS"]
    root = os.environ.get("SIPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sipt"
    )
    return os.path.join(root, "assets")


def default_model():
    return os.path.join(assets_dir(), MODEL_REL)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(base, timeout):
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout) as r:
            return r.status == 200 and b"ok" in r.read().lower()
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--port", type=int, default=8080, help="TCP port on 127.0.0.1 (0: a free one)")
    ap.add_argument("--ctx", type=int, default=4096, help="context tokens per parallel slot")
    ap.add_argument("--parallel", type=int, default=2, help="requests decoded at once (slots)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest on a busy machine)")
    ap.add_argument("--health-timeout", type=float, default=120.0, help="seconds to wait for /health")
    ap.add_argument("--exit-on-stdin-eof", action="store_true", help="stop when stdin closes")
    ap.add_argument("--print-model", action="store_true", help="print the model path that would be served, and exit")
    args = ap.parse_args()

    model = os.path.abspath(os.path.expanduser(args.model or default_model()))
    if args.print_model:
        print(model)
        return
    if not os.path.isfile(model):
        fail(2, f"model not found: {model} (run scripts/fetch-assets.sh smollm2, or pass --model)")
    if args.port < 0 or args.port > 65535 or args.parallel < 1 or args.threads < 1 or args.ctx < 256:
        fail(2, "bad --port/--parallel/--threads/--ctx")
    try:
        import xllamacpp
    except ImportError as e:
        fail(2, f"cannot import xllamacpp ({e}); pip install xllamacpp==2026.10.11549")

    port = args.port or free_port()
    params = xllamacpp.CommonParams()
    params.model.path = model
    params.hostnames = ["127.0.0.1"]
    params.port = port
    params.n_parallel = args.parallel
    params.n_ctx = args.ctx * args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.endpoint_metrics = True

    # The server object must stay referenced for as long as it serves.
    server = xllamacpp.Server(params)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.health_timeout
    while not healthy(base, timeout=2.0):
        if time.monotonic() > deadline:
            fail(3, f"{base}/health not OK after {args.health_timeout:.0f}s")
        time.sleep(0.2)
    print(f"SIPT_LLM_SERVER_URL={base}/v1", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.exit_on_stdin_eof:
        def watch_stdin():
            try:
                while sys.stdin.buffer.read(4096):
                    pass
            except OSError:
                pass
            stop.set()

        threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop.wait(1.0):
        pass
    # Exit at once: the server's destructor would wait for requests still being decoded, and
    # the native threads need no orderly unwinding.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
