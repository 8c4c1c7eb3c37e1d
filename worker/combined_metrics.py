"""`nextserve serve --metrics-port`: one Prometheus endpoint for the router and worker rank 0 together.

`serve` starts both children with their own /metrics on loopback ports; a scrape of this endpoint
fetches their pages and returns them one after the other. Their metric names never overlap
(`nextserve_router_*`, `nextserve_worker_*`), so the result is one valid exposition. The scrape also
reports `nextserve_serve_target_up{target}`, 1 when that child answered (like Prometheus's own
`up`), so a page without the worker's half is not mistaken for a worker that counts zero.
"""

from __future__ import annotations

import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FETCH_TIMEOUT_S = 5.0


class CombinedMetrics:
    def __init__(self, targets: dict[str, str]):
        """targets: name (the `target` label) -> URL of that process's /metrics."""
        self.targets = dict(targets)
        self._server: ThreadingHTTPServer | None = None

    def render(self) -> bytes:
        pages, up = [], {}
        for name, url in self.targets.items():
            try:
                with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
                    page = response.read()
            except OSError:  # not started yet, or gone: said by the up gauge
                up[name] = 0
                continue
            pages.append(page if page.endswith(b"\n") or not page else page + b"\n")
            up[name] = 1
        lines = ["# HELP nextserve_serve_target_up Whether this scrape read the serve child's own /metrics",
                 "# TYPE nextserve_serve_target_up gauge"]
        lines += [f'nextserve_serve_target_up{{target="{name}"}} {value}' for name, value in up.items()]
        return b"".join(pages) + ("\n".join(lines) + "\n").encode()

    def bind(self, host: str, port: int) -> int:
        """Take the port (0: a free one, returned); nothing is served before `start`."""
        handler = type("MetricsHandler", (_Handler,), {"metrics": self})
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port} ({e.strerror or e}); pick another "
                          f"--metrics-port") from None
        self._server.daemon_threads = True
        return self._server.server_port

    def start(self) -> None:
        """Serve /metrics on a daemon thread. `serve` starts it once its children are spawned: they are
        forked with a preexec_fn, which is not safe while other threads run."""
        threading.Thread(target=self._server.serve_forever, name="combined-metrics", daemon=True).start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Handler(BaseHTTPRequestHandler):
    metrics: CombinedMetrics

    def do_GET(self):
        if self.path.split("?", 1)[0] not in ("/", "/metrics"):
            self.send_error(404, "only /metrics is served here")
            return
        body = self.metrics.render()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # scrapes every few seconds would flood the log
        pass
