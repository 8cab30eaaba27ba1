"""Serving a built feature-browser site on a local HTTP server.

The server sends the site's Content-Security-Policy as a header too (the page also sets it in a
meta tag; see :mod:`sae_platform.browser.generate`), with ``nosniff``, no referrer, and
``no-cache`` on the shell and the ``site.json`` pointer, so a rebuild is seen on the next load.
``sae_platform.live`` serves the same site with a live encoding endpoint added; this server answers
the page's probe of it (``GET /api/limits``) with 204, so the page offers no live page.

Given the artifact root's ``reports/`` folder (``reports_dir``), the server also serves it under
``reports/`` (``catalog.reports_url_path``): the sweep comparison page, which the overview links
to, with that page's own CSP (``compare.PAGE_CSP``: inline style, no script).

Text files (JSON, JS, CSS, HTML, SVG) go out gzip-compressed when the request accepts it
(``Accept-Encoding: gzip``), with ``Vary: Accept-Encoding``: a 64-feature chunk of a synthetic
SAE's feature data is ~660 KB of JSON and goes out as a fraction of it. Each file is compressed
once per version of it (cached by path, size and modification time). The site needs nothing else
of a server: sort orders and search postings are precomputed files
(:mod:`sae_platform.browser.index_files`), so a bucket serves the same site.

Every request's ``Host`` header is checked (``host_allowed``) against the names this server
answers to: the address it is bound to, the loopback names (``localhost``, 127.0.0.1, ::1), and
the names in ``$SAE_PLATFORM_ALLOWED_HOSTS`` (comma-separated; the names a proxy forwards);
bound to every address (0.0.0.0), any IP address too. Anything else gets 403. This defeats DNS
rebinding: a web page on ``attacker.example`` whose name is made to resolve to 127.0.0.1 reaches
the socket, but its requests carry ``Host: attacker.example``.
"""

from __future__ import annotations

import errno
import functools
import gzip
import http.server
import io
import ipaddress
import os
import socket
import threading
import urllib.parse
from pathlib import Path

from sae_platform.browser.address import DEFAULT_HOST, DEFAULT_PORT
from sae_platform.browser.generate import CSP, SITE_POINTER
from sae_platform.catalog import REPORTS
from sae_platform.compare import PAGE_CSP
from sae_platform.errors import PlatformError
from sae_platform.settings import env_value

ALLOWED_HOSTS_ENV = "SAE_PLATFORM_ALLOWED_HOSTS"
LIMITS_PATH = "/api/limits"   # the live server's bounds; the page probes it (here: 204, no live endpoint)
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})
COMPRESSED_SUFFIXES = (".json", ".js", ".css", ".html", ".svg", ".txt")
REPORTS_PREFIX = f"/{REPORTS}/"


def allowed_hosts(bound: str, extra=None) -> frozenset[str]:
    """The host names a server bound to ``bound`` answers to: ``bound``, the loopback names, and
    ``extra`` (default: the comma-separated names in ``$SAE_PLATFORM_ALLOWED_HOSTS``), lower case."""
    if extra is None:
        extra = env_value(ALLOWED_HOSTS_ENV, "").split(",")
    return frozenset(name.strip().lower().strip("[]") for name in (bound, *LOOPBACK_NAMES, *extra) if name.strip())


def host_allowed(host_header: str | None, names: frozenset[str], bound: str) -> bool:
    """Whether a request's ``Host`` header (``name``, ``name:port``, ``[v6]:port``) names this server.
    A request without one (HTTP/1.0) is allowed: browsers always send it, so no rebinding comes
    without it. Bound to a wildcard address, an IP literal is allowed too (no DNS is involved)."""
    if host_header is None:
        return True
    host = host_header.strip().lower()
    host = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 \
        else host
    if host in names:
        return True
    if bound in WILDCARD_ADDRESSES:
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            return False
    return False


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an ``Accept-Encoding`` header accepts gzip (``gzip`` or ``*`` without ``q=0``)."""
    for part in (accept_encoding or "").lower().split(","):
        name, _, params = part.strip().partition(";")
        if name.strip() in ("gzip", "*"):
            q = params.strip().removeprefix("q=") if params.strip().startswith("q=") else "1"
            try:
                return float(q) > 0
            except ValueError:
                return False
    return False


@functools.lru_cache(maxsize=64)
def _gzipped(path: str, size: int, mtime_ns: int) -> bytes:
    """The gzip of the file at ``path`` as it is at (``size``, ``mtime_ns``): the key makes a
    rewritten file compress anew."""
    return gzip.compress(Path(path).read_bytes(), compresslevel=6, mtime=0)


class _Handler(http.server.SimpleHTTPRequestHandler):
    quiet = False
    hosts: frozenset[str] = LOOPBACK_NAMES
    reports_dir: str | None = None

    def parse_request(self) -> bool:
        """http.server's request parsing, then the Host check (module docstring): 403 when the
        header names another server."""
        if not super().parse_request():
            return False
        bound = str(self.server.server_address[0])
        host = self.headers.get("Host")
        if host_allowed(host, self.hosts, bound):
            return True
        self.send_error(403, "Host not allowed",
                        f"this server answers to {', '.join(sorted(self.hosts))}, not Host: {host!r}; behind a proxy, "
                        f"add the name to {ALLOWED_HOSTS_ENV} (comma-separated)")
        return False

    def do_GET(self):  # http.server's name
        """Files of the site; the live probe answered 204 (the page then offers no live page, and
        the browser logs no failed request)."""
        if self.path.split("?")[0] == LIMITS_PATH:
            self.send_response(204)
            self.end_headers()
            return None
        return super().do_GET()

    def _in_reports(self) -> bool:
        return self.reports_dir is not None and urllib.parse.urlsplit(self.path).path.startswith(REPORTS_PREFIX)

    def translate_path(self, path: str) -> str:
        """The file of a URL path: below the site, or below ``reports_dir`` for ``reports/...``
        (http.server's rules either way: no ``..`` escapes the folder)."""
        if not self._in_reports():
            return super().translate_path(path)
        site, self.directory = self.directory, self.reports_dir
        try:
            return super().translate_path(path[len(REPORTS_PREFIX) - 1:])
        finally:
            self.directory = site

    def send_head(self):
        """http.server's response head, with a text file's body gzip-compressed when the client
        accepts it (module docstring)."""
        path = self.translate_path(self.path)
        if not (path.endswith(COMPRESSED_SUFFIXES) and os.path.isfile(path)
                and accepts_gzip(self.headers.get("Accept-Encoding"))):
            return super().send_head()
        try:
            st = os.stat(path)
            body = _gzipped(path, st.st_size, st.st_mtime_ns)
        except OSError:
            return super().send_head()
        self.send_response(200)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Vary", "Accept-Encoding")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Last-Modified", self.date_time_string(int(st.st_mtime)))
        self.end_headers()
        return io.BytesIO(body)

    def end_headers(self):
        csp = PAGE_CSP if self._in_reports() else CSP
        self.send_header("Content-Security-Policy", csp + "; frame-ancestors 'none'")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if self.path.split("?")[0].endswith(("/" + SITE_POINTER, "/index.html", "/")):
            self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format, *args):
        if not self.quiet:
            super().log_message(format, *args)


def make_server(site_dir, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, quiet: bool = False,
                handler_methods: dict | None = None, extra_hosts=None, reports_dir=None):
    """A threaded HTTP server for the site in ``site_dir`` (not started; port 0 picks a free one).
    ``reports_dir``: the artifact root's ``reports/`` folder, served under ``reports/`` (None:
    not served). ``handler_methods``: further request-handler methods (the live server's ``do_POST``);
    ``extra_hosts``: host names it answers to besides its address and loopback (default
    ``$SAE_PLATFORM_ALLOWED_HOSTS``; ``allowed_hosts``). PlatformError naming the port and the fix
    when another server holds it (it is bound here, before the caller loads anything slow)."""
    site_dir = Path(site_dir)
    if not (site_dir / SITE_POINTER).is_file():
        raise PlatformError(f"{site_dir} is not a built feature-browser site (no {SITE_POINTER})",
                            "build it first with sae_platform.browser.publish.build_site, or point at its directory")
    handler = type("Handler", (_Handler,), {"quiet": quiet, "hosts": allowed_hosts(host, extra_hosts),
                                            "reports_dir": None if reports_dir is None else str(reports_dir),
                                            **(handler_methods or {})})
    try:
        server = http.server.ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(site_dir)))
    except OSError as error:
        raise _port_error(error, host, port) from None
    server.daemon_threads = True
    return server


def require_free_port(host: str, port: int) -> None:
    """Fail at once, before anything slow loads, when another server holds ``port`` on ``host``:
    a PlatformError naming the port and the fix (the server binds it again when it starts)."""
    server_class = http.server.ThreadingHTTPServer
    with socket.socket(server_class.address_family, socket.SOCK_STREAM) as probe:
        if server_class.allow_reuse_address:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server binds it
        try:
            probe.bind((host, port))
        except OSError as error:
            raise _port_error(error, host, port) from None


def _port_error(error: OSError, host: str, port: int) -> OSError | PlatformError:
    """A port in use as a PlatformError naming it and the fix; any other bind error as it was."""
    if error.errno != errno.EADDRINUSE:
        return error
    return PlatformError(f"port {port} on {host} is in use: another server (`make browse`, `sae-platform browse` or "
                         "`sae-platform serve`?) already listens there",
                         f"start this one on another port (--port {port + 1}), or stop the server on port {port} first")


def serve(site_dir, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, reports_dir=None) -> None:
    """Serve a built site (and ``reports_dir`` under ``reports/``) until interrupted."""
    serve_until_interrupted(make_server(site_dir, host, port, reports_dir=reports_dir),
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
