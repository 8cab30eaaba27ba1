"""Serving a built feature-browser site on a local HTTP server.

The server sends the site's Content-Security-Policy as a header too (the page also sets it in a
meta tag; see :mod:`sae_platform.browser.generate`), with ``nosniff``, no referrer, and
``no-cache`` on the shell and the ``site.json`` pointer, so a rebuild is seen on the next load.
``sae_platform.live`` serves the same site with a live encoding endpoint added.
"""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

from sae_platform.browser.generate import CSP, SITE_POINTER
from sae_platform.errors import PlatformError


class _Handler(http.server.SimpleHTTPRequestHandler):
    quiet = False

    def end_headers(self):
        self.send_header("Content-Security-Policy", CSP + "; frame-ancestors 'none'")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if self.path.split("?")[0].endswith(("/" + SITE_POINTER, "/index.html", "/")):
            self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format, *args):
        if not self.quiet:
            super().log_message(format, *args)


def make_server(site_dir, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False,
                handler_methods: dict | None = None):
    """A threaded HTTP server for the site in ``site_dir`` (not started; port 0 picks a free one).
    ``handler_methods``: further request-handler methods (the live server's ``do_POST``)."""
    site_dir = Path(site_dir)
    if not (site_dir / SITE_POINTER).is_file():
        raise PlatformError(f"{site_dir} is not a built feature-browser site (no {SITE_POINTER})",
                            "build it first with sae_platform.browser.publish.build_site, or point at its directory")
    handler = type("Handler", (_Handler,), {"quiet": quiet, **(handler_methods or {})})
    server = http.server.ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(site_dir)))
    server.daemon_threads = True
    return server


def serve(site_dir, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve a built site until interrupted."""
    serve_until_interrupted(make_server(site_dir, host, port),
                            f"Feature browser: http://{{host}}:{{port}}/  (serving {Path(site_dir).resolve()}; "
                            "Ctrl-C stops)")


def serve_until_interrupted(server, banner: str) -> None:
    """Print ``banner`` (``{host}``/``{port}`` filled in) and serve until Ctrl-C; close the socket."""
    h, p = server.server_address[:2]
    print(banner.format(host=h, port=p), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def serve_in_thread(site_dir, host: str = "127.0.0.1", port: int = 0, server=None):
    """Start a quiet server (``server``, or one for ``site_dir``) on a thread; returns (server, url).
    Stop with ``server.shutdown()``."""
    server = server or make_server(site_dir, host, port, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    h, p = server.server_address[:2]
    return server, f"http://{h}:{p}/"
