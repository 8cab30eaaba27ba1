"""Reading what the pipeline built: `lineage` of a feature table, the browser (`browse`), and the
browser with live text -> features (`serve`)."""

import os
import sys
from pathlib import Path

from jobs.cli.common import _definitions, _described_sae


def cmd_lineage(args) -> int:
    """The lineage recorded with one feature shard's tables and the asset graph upstream of
    ``feature_topk``: read from the store and a static table (``jobs.asset_graph``), so it answers at
    once, without Dagster or torch (the record already names the Dagster run that built the tables)."""
    from jobs.asset_graph import ASSET_PARENTS
    from jobs.cli.common import deployed_store_and_sae
    from sae_platform.lineage import (
        format_asset_edges,
        format_lineage,
        lineage_with_current_shuffle,
        recorded_shard_count,
    )

    store, deployed_sae = deployed_store_and_sae()
    args.sae = args.sae or deployed_sae
    _require_sae_with_tables(store, args.sae)
    n_shards = recorded_shard_count(store, args.sae)  # the layout the stored tables were built in
    if not 0 <= args.shard < n_shards:
        sys.exit(f"error: there is no feature shard {args.shard}: shards are 0–{n_shards - 1} (the tables of "
                 f"{args.sae!r} are cut into {n_shards} shards, as `sae-platform status` counts them; --shard N)")
    print(format_lineage(lineage_with_current_shuffle(store, args.sae, args.shard)))
    print("\nasset graph upstream of feature_topk (each asset ← the assets it reads):")
    print(format_asset_edges(ASSET_PARENTS, "feature_topk"))
    return 0


def _saes_with_tables(store) -> list[str]:
    from sae_platform.catalog import described_saes

    return described_saes(store)


def _require_sae_with_tables(store, sae: str) -> None:
    """Exit naming the SAEs that do have feature tables when ``sae`` has none."""
    from sae_platform.catalog import trained_saes

    known = _saes_with_tables(store)
    if sae in known:
        return
    trained = trained_saes(store)
    root = store.url(store.root)
    if sae in trained:
        sys.exit(f"error: SAE {sae!r} is trained but has no feature tables under {root}: build them with "
                 f"`sae-platform features --sae {sae}` (or materialize feature_topk)")
    sys.exit(f"error: no SAE named {sae!r} in the artifact root {root}; known: "
             + (", ".join(known) if known else "none with feature tables")
             + (f" (trained without tables: {', '.join(t for t in trained if t not in known)})"
                if any(t not in known for t in trained) else ""))


def cmd_serve(args) -> int:
    """The browser plus the live endpoint: the base model and the SAE of the checkpoint the browser
    shows answer typed text. The port is bound before anything loads, so a used one fails at once."""
    from sae_platform.browser.server import require_free_port, serve_until_interrupted

    require_free_port(args.host, args.port)   # before the definitions, torch and the models load
    from sae_platform.catalog import reports_folder
    from sae_platform.live import LIVE_BANNER, SiteEncoder, checkpoint_loader, make_live_server
    from sae_platform.model import pick_device

    site, defs, store = _site(args)
    device = pick_device(args.device)
    load_model = lambda: defs.resources["language_model"].load(store, device=str(device))[0]  # noqa: E731
    load = checkpoint_loader(store, args.sae, load_model, device, max_tokens=args.max_tokens)
    encoder = SiteEncoder(site, load)
    server = make_live_server(site, encoder, host=args.host, port=args.port, reports_dir=reports_folder(store))
    try:
        print(f"loading the base model and the SAE of checkpoint {encoder.site_checkpoint()} …", flush=True)
        encoder.current()
    except BaseException:
        server.server_close()
        raise
    serve_until_interrupted(server, LIVE_BANNER)
    return 0


def cmd_browse(args) -> int:
    from sae_platform.browser.server import require_free_port, serve
    from sae_platform.catalog import reports_folder

    require_free_port(args.host, args.port)   # before the definitions load
    site, _, store = _site(args)
    serve(site, host=args.host, port=args.port, reports_dir=reports_folder(store))
    return 0


def _site(args):
    """(local site folder, definitions, store) of the browser of ``args.sae``; exits saying why not."""
    from sae_platform.catalog import browser_dir

    defs = _definitions()
    store = defs.resources["storage"].store()
    args.sae = args.sae or _described_sae(defs)
    site = browser_dir(store, args.sae)
    if not store.is_local:
        sys.exit(f"the feature browser is at {store.url(site)}: serve it from any static web host, or copy it "
                 "to a local folder (e.g. `aws s3 sync`) and run `python -m sae_platform.browser serve DIR`")
    if not os.path.exists(os.path.join(site, "index.html")):
        root, env = store.url(store.root), os.environ.get("SAE_PLATFORM_ROOT")
        where = (f"SAE_PLATFORM_ROOT={env}" if env else
                 f"SAE_PLATFORM_ROOT is unset, so the root is ./artifacts of the current folder {os.getcwd()}")
        sites = browser_dir(store)
        built = [e.name for e in Path(sites).glob("*") if (e / "index.html").exists()] if os.path.isdir(sites) else []
        if built:
            sys.exit(f"error: no feature browser of SAE {args.sae!r} in the artifact root {root} ({where}); it has "
                     f"browsers of: {', '.join(sorted(built))} (pass --sae NAME)")
        if not os.path.isdir(root) or not os.listdir(root):
            sys.exit(f"error: the artifact root {root} is {'empty' if os.path.isdir(root) else 'missing'} "
                     f"({where}): run from the folder the pipeline ran in (the repository, with `make browse`), "
                     "or set SAE_PLATFORM_ROOT to its artifacts folder")
        sys.exit(f"error: no feature browser in the artifact root {root} ({where}): build it with `make demo` or "
                 f"`sae-platform features --sae {args.sae}`, or point SAE_PLATFORM_ROOT at the root it was built in")
    return site, defs, store
