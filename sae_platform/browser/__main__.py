"""The feature browser: a static single-page site generated from the feature tables.

``python -m sae_platform.browser serve DIR [--port N]`` serves a built site;
``python -m sae_platform.browser demo DIR [--features N]`` builds one from synthetic tables.
"""

from __future__ import annotations

import argparse
import json
import time

from sae_platform.browser.address import DEFAULT_HOST, DEFAULT_PORT


def main(argv: list[str] | None = None) -> int:
    shows_defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    parser = argparse.ArgumentParser(prog="python -m sae_platform.browser", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve", help="serve a built site", **shows_defaults)
    p_serve.add_argument("site_dir", help="the built site's folder (holding site.json)")
    p_serve.add_argument("--host", default=DEFAULT_HOST, help="address to bind; 127.0.0.1 answers this machine only")
    p_serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    p_demo = sub.add_parser("demo", help="build a site from synthetic tables (and print size and time)",
                            **shows_defaults)
    p_demo.add_argument("site_dir", help="folder to build the site in")
    p_demo.add_argument("--features", type=int, default=16384, help="latents of the synthetic SAE")
    p_demo.add_argument("--serve", action="store_true", help="serve the site once built")
    p_demo.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to serve it on")
    args = parser.parse_args(argv)
    from sae_platform.browser.publish import build_site
    from sae_platform.browser.server import serve
    from sae_platform.browser.synthetic import synthetic_lineage, synthetic_shards

    if args.cmd == "serve":
        serve(args.site_dir, args.host, args.port)
        return 0
    t0 = time.perf_counter()
    shards, edges = synthetic_shards(args.features)
    made = time.perf_counter() - t0
    summary = build_site(args.site_dir, sae_name="demo", shards=shards, hist_bin_edges=edges,
                         lineage=synthetic_lineage())
    print(json.dumps({**summary, "tables_seconds": round(made, 2)}))
    if args.serve:
        serve(args.site_dir, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
