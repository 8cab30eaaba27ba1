"""`sae-platform status`: what is stored, read from the artifact store alone (no Dagster, no torch)."""

from jobs.settings import Settings
from sae_platform.errors import PlatformError, printable


def describe_eval(report: dict) -> str:
    """The evaluation's headline figures, each dead-latent figure with the window it was measured on."""
    parts = [f"{k} {report[k]:.4g}" for k in ("fvu", "l0") if report.get(k) is not None]
    if report.get("dead_fraction") is not None:
        window = report.get("dead_window_tokens")
        parts.append(f"dead {report['dead_fraction']:.1%}" + (f" (never fired in {window:,} tokens)" if window else ""))
    if report.get("loss_recovered") is not None:
        parts.append(f"loss recovered {report['loss_recovered']:.4g}")
    return ", ".join(parts)


def _print_status() -> None:
    """What is stored, read from the artifact store alone (no Dagster, no torch: it answers at once)."""
    from sae_platform import catalog
    from sae_platform.storage import open_store

    settings = Settings.from_env()
    store = open_store(settings.root_url, settings.s3_endpoint_url)
    print(f"\nartifact root: {store.url(store.root)}")
    for name in store.committed_names(catalog.ACTIVATIONS):
        pointer = store.pointer(name)
        print(f"  {name}: committed {pointer['version']}")
    _print_inbox(settings, store)
    for name in store.committed_names(catalog.SHUFFLED):
        pointer = store.pointer(name)
        print(f"  {name}: {pointer.get('n_rows', '?'):,} rows, plan {pointer.get('plan_id')}")
    for name in store.committed_names(catalog.CHECKPOINTS):
        pointer = store.pointer(name)
        print(f"  {name}: step {pointer['step']}, {pointer['tokens']:,} tokens{' (final)' if pointer['final'] else ''}")
    for name in store.committed_names(catalog.EVALUATIONS):
        print(f"  {name}: {describe_eval(store.read_json(f'{store.resolve(name)}/{catalog.EVAL_REPORT}'))}")
    for sae_name in catalog.trained_saes(store):
        _print_features(store, sae_name)


def _print_features(store, sae_name: str) -> None:
    """The feature tables and browser of one SAE: the checkpoint each describes and whether it
    describes every cached batch. Every verdict is a link of ``freshness.sae_chain_state``, the
    rule of the ``describes_every_cached_batch`` check, so no line says "current" while the chain
    is behind (a batch cached but not yet shuffled, trained on or in the tables); the browser's line
    also says when its overview's figures are older than the committed ones
    (``freshness.browser_figures_behind``, the rule the browser is rebuilt on)."""
    from sae_platform.freshness import browser_figures_behind, feature_state, sae_chain_state

    state = feature_state(store, sae_name)
    built = [f"f{i}" for i, pinned in enumerate(state.shards) if pinned is not None]
    described = sorted({pinned for pinned in state.shards if pinned is not None})
    tables = (f"{len(built)} of {len(state.shards)} feature shard(s) built"
              + (f" ({', '.join(built)}), describing checkpoint {', '.join(described)}" if built else ""))
    browser = f"shows checkpoint {state.browser}" if state.browser else "never built"
    try:
        chain = sae_chain_state(store, sae_name)
        tables_behind, browser_behind = chain.tables_behind(), chain.browser_behind()
        figures_behind = browser_figures_behind(store, sae_name)
    except (PlatformError, OSError, ValueError) as error:  # a damaged record: say so, list the rest
        tables_behind = browser_behind = [f"cannot tell ({error})"]
        figures_behind = []
    print(f"  feature tables of {sae_name}: {tables}: {_verdict(tables_behind)}")
    print(f"  feature browser of {sae_name}: {browser}: {_verdict(browser_behind + figures_behind)}")
    print(f"  {sae_name} downstream of the cached activations: "
          + (_verdict(browser_behind) if browser_behind else "current (describes every cached batch)"))


def _verdict(behind: list[str]) -> str:
    """'current', or 'behind: ' and every reason."""
    return f"behind: {'; '.join(behind)}" if behind else "current"


def _print_inbox(settings: Settings, store) -> None:
    """Every inbox file: readable ones that wait for caching (with the key they get), and those not
    cached with why: skipped (never read) or failed (their last attempt)."""
    from sae_platform.corpus import display_name, resolve_source
    from sae_platform.inbox import inbox_report, needs_caching, scan_inbox

    try:
        inbox = scan_inbox(*resolve_source(settings.inbox, settings.s3_endpoint_url), store)
    except (PlatformError, OSError) as error:
        print("\n" + printable(f"inbox {settings.inbox}: cannot be listed ({error})"))
        return
    waiting = needs_caching(store, inbox.stamps, inbox.access)
    lines = inbox_report(inbox, store)
    print(f"\ninbox {printable(settings.inbox)}: {len(inbox.files)} readable file(s), {len(waiting)} waiting to be "
          "cached"
          + (f"; {len(lines)} other line(s):" if lines else ""))
    names = {f.key: display_name(f.url) for f in inbox.files}
    for key in waiting:
        print(f"  to cache {names[key]} as partition {key}")
    for line in lines:
        print(line)


def cmd_status(args) -> int:
    _print_status()
    return 0
