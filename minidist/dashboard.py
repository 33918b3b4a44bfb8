"""A small read-only status page for the center (``dcenter --dashboard-port P``).

``GET /`` (or ``/status.json``) answers JSON: task counts by state and, per
worker, threads, tasks processing, keys held and seconds since it was last
heard from.  It reads the center's state the same way rpc queries do,
through the scheduler thread, so it never races the scheduler.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from .wire import format_address

if TYPE_CHECKING:
    from .center import Center


def serve_dashboard(center: Center, host: str, port: int) -> str:
    """Serve the status page in a background thread; returns its URL."""
    info = center._query(center.info)
    workers = center._query(center.worker_info)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path not in ("/", "/status.json"):
                self.send_error(404)
                return
            body = json.dumps({"center": center.address, "info": info(None),
                               "workers": workers(None)}, indent=1).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # requests are not worth a log line

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="dashboard", daemon=True).start()
    bound_host, bound_port = httpd.server_address[:2]
    return f"http://{format_address(center.address.rpartition(':')[0], bound_port)}/"
