"""Publishing a feature-browser site: the files of :func:`sae_platform.browser.generate.site_files`
written as one build, locally or to an fsspec filesystem (S3), and the cleanup of older builds.

Writing is atomic. Locally, ``out`` is a symbolic link to a complete build in the sibling folder
``.<out>.versions/<version>/``: a build writes a new version folder there (marked in flight by
``.building.json`` with its process id) and switches by one ``rename`` of a new link over ``out``
(atomic on POSIX), so a reader sees the old site or the new one, never a half; a kill at any
point leaves the previous site served. Every build sweeps what earlier ones left (killed builds'
folders, the ``.tmp-*`` / ``.old-*`` folders of the earlier layout) and keeps the current version
and the one before it (a page opened before the switch still loads its feature files until the
next build). A site of the earlier layout (a real folder) is swapped for the link atomically too
(``renameat2(RENAME_EXCHANGE)`` on Linux). On an fsspec filesystem (``fs=``, or a URL) the
versioned data is written first and ``site.json`` last (the switch), and data versions older than
the previous one are removed after it.

:func:`site_record` reads back the pointer (``site.json``) of a published site.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from sae_platform.browser.generate import SITE_POINTER, VERSION_RE, SiteSummary, site_parts
from sae_platform.errors import PlatformError
from sae_platform.filesystems import open_fs


def build_site(out, *, sae_name: str, shards: list[dict], hist_bin_edges: list[float], lineage: dict,
               n_intervals: int | None = None, fs=None, dagster_url: str | None = None,
               evaluation: dict | None = None, hook_point: str | None = None,
               absorption: dict | None = None, figures_version: str | None = None) -> dict:
    """Generate the browser site for SAE ``sae_name`` into ``out`` (a local directory, or a path on the
    fsspec filesystem ``fs``, or a URL). ``shards``: one dict per feature shard with ``start``,
    ``stop`` and the polars frames ``feature_stats``, ``feature_examples``, ``feature_contexts``,
    ``logit_effects`` (any may be None), in the dict or lazily by its ``load``
    (:func:`sae_platform.browser.generate.site_files`): lazily, the build holds one shard's tables
    at a time plus every shard's list rows (``summary_bytes``). ``hist_bin_edges``: the histogram bin edges (histograms
    with len(edges) + 1 counts have underflow and overflow bins). ``n_intervals``: when given, the
    interval examples are labelled with their range (interval j: [j, j+1) * max / n_intervals).
    A shard may carry ``lineage`` (its own record, shown on its features' pages); ``dagster_url``:
    the Dagster UI those pages link to (default: :func:`sae_platform.browser.generate.dagster_ui_url`).
    A shard may carry
    ``explanations`` (N2G explanation, scores, nearest and co-occurring features per feature) and
    ``evaluation`` is the SAE's evaluation report (the overview page shows its figures), and
    ``absorption`` its absorption result (figures or refusal, and the per-letter chart);
    ``figures_version`` what they were read from (pinned in ``site.json``).
    ``hook_point``: where the SAE reads (e.g. ``blocks.4.hook_mlp_out``; a transcoder ``IN -> OUT``),
    shown in every page's header.
    Each feature shard's files go to a folder named by their digest (``generate.shard_folder``):
    a folder the current site already has is kept, not rewritten (locally: hard links into the
    new version; on fsspec: left in place).
    Returns a summary: n_features, bytes, files, seconds, path, version, index_bytes,
    shards_written, shards_kept, summary_bytes (the per-feature summaries the site-wide index was
    built from, held to the end: ``generate.SiteSummary``)."""
    t0 = time.perf_counter()
    held = SiteSummary()
    parts = site_parts(sae_name=sae_name, shards=shards, hist_bin_edges=hist_bin_edges, lineage=lineage,
                       n_intervals=n_intervals, dagster_url=dagster_url, evaluation=evaluation,
                       hook_point=hook_point, absorption=absorption, figures_version=figures_version,
                       summary=held)
    tally = _Tally(parts)
    if fs is None and "://" in str(out):
        fs, out = open_fs(str(out))
    path = _write_local(Path(out), tally) if fs is None else _write_fs(fs, str(out).rstrip("/"), tally)
    pointer = json.loads(tally.site[SITE_POINTER])
    index = tally.site[f"{pointer['data']}/index.json"]
    return {"n_features": json.loads(index)["n_features"], "bytes": tally.bytes, "files": tally.files,
            "seconds": round(time.perf_counter() - t0, 3), "path": str(path), "version": pointer["version"],
            "index_bytes": len(index), "shards_written": tally.written, "shards_kept": tally.kept,
            "summary_bytes": held.nbytes}


class _Tally:
    """The parts of a build (``site_parts``) as a writer consumes them, counted: bytes and files of
    the whole site, shards written and kept; ``site``: the site-wide files once reached."""

    def __init__(self, parts):
        self.parts, self.bytes, self.files, self.written, self.kept, self.site = parts, 0, 0, 0, 0, {}

    def __iter__(self):
        for folder, files in self.parts:
            self.bytes += sum(len(b) for b in files.values())
            self.files += len(files)
            if folder is None:
                self.site = files
            yield folder, files


_STEP_HOOK = None   # tests: called with the name of each step of a local build ("writing", "written", "switched")


def _step(name: str) -> None:
    if _STEP_HOOK is not None:
        _STEP_HOOK(name)


BUILDING_MARK = ".building.json"
STALE_BUILD_S = 24 * 3600


def site_record(store, site: str) -> dict | None:
    """The site pointer (``site.json``: version, data folder, run, the checkpoint shown) of the site
    at ``site`` (a path in ``store``); None when no site was built there."""
    pointer = f"{site}/{SITE_POINTER}"
    return store.read_json(pointer) if store.fs.exists(pointer) else None


def versions_dir(out: Path) -> Path:
    """Where the local builds of the site ``out`` live (``out`` is a link to one of them)."""
    return out.parent / f".{out.name}.versions"


def _check_target(out: Path, versions: Path) -> None:
    if out.is_symlink():
        target = Path(os.path.normpath(out.parent / os.readlink(out)))
        if target.parent == versions:
            return
        raise PlatformError(f"{out} is a link to {target}, not to a feature-browser build; not replacing it",
                            "pass a new directory, or the directory of an earlier site build")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / SITE_POINTER).is_file())):
        raise PlatformError(f"{out} exists and is not a feature-browser site (no {SITE_POINTER}); not replacing it",
                            "pass a new directory, or the directory of an earlier site build")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _switch(out: Path, versions: Path, version: str) -> None:
    """Point ``out`` at ``versions/version`` in one atomic rename."""
    link = out.parent / f".{out.name}.link-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.join(versions.name, version), link)
    try:
        if out.is_dir() and not out.is_symlink():        # a site of the earlier layout: a real folder
            if _exchange(link, out):                      # now `link` is the old folder
                shutil.rmtree(link, ignore_errors=True)
                return
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)                               # no renameat2: two renames, old folder swept later
        os.replace(link, out)
    finally:
        if link.is_symlink():
            link.unlink()


def _build_alive(folder: Path) -> bool:
    try:
        mark = json.loads((folder / BUILDING_MARK).read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return False
    if time.time() - mark.get("started", 0) > STALE_BUILD_S:
        return False
    if mark.get("host") != socket.gethostname():
        return True
    from sae_platform.storage import process_alive

    return process_alive(int(mark.get("pid", -1)))


def sweep_site(out) -> list[str]:
    """Remove what earlier builds of ``out`` left: killed builds, leftovers of the earlier layout,
    and versions older than the one before the current. Returns the removed paths."""
    out = Path(os.path.abspath(out))
    versions = versions_dir(out)
    current = None
    if out.is_symlink():
        current = Path(os.readlink(out)).name
    removed = []
    for entry in out.parent.glob(f".{out.name}.*"):
        if entry == versions:
            continue
        if entry.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-", f".{out.name}.link-")):
            if entry.name.startswith(f".{out.name}.link-") and entry.is_symlink():
                entry.unlink()
            else:
                shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
    if not versions.is_dir():
        return removed
    # complete builds, oldest first (by when their site.json was written: names may share a second)
    complete = sorted((p for p in versions.iterdir() if p.is_dir() and not (p / BUILDING_MARK).exists()
                       and (p / SITE_POINTER).is_file()), key=lambda p: (p / SITE_POINTER).stat().st_mtime_ns)
    names = [p.name for p in complete]
    before = names[:names.index(current)] if current in names else names
    previous = before[-1:]
    keep = {current, *previous}
    for entry in versions.iterdir():
        if entry.name in keep or _build_alive(entry):   # current, previous, another build in flight
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
        removed.append(str(entry))
    return removed


def _keep_folder(previous: Path, folder: Path) -> None:
    """Hard-link every file of ``previous`` (a shard folder of the current build) into ``folder``:
    the same bytes and modification times, nothing rewritten (a copy keeping both where links fail)."""
    for src in previous.rglob("*"):
        dst = folder / src.relative_to(previous)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    for d in sorted({(folder / rel).parent for rel in files}):
        d.mkdir(parents=True, exist_ok=True)
    for rel, body in files.items():
        (folder / rel).write_bytes(body)


def _write_local(out: Path, parts: _Tally) -> Path:
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = versions_dir(out)
    _check_target(out, versions)
    sweep_site(out)
    current = out.resolve() if out.is_symlink() else out if out.is_dir() else None
    folder = versions / f".building-{uuid.uuid4().hex[:8]}"   # named by its version once that is known
    folder.mkdir(parents=True)
    (folder / BUILDING_MARK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                    "started": time.time()}))
    try:
        for i, (shard, files) in enumerate(parts):
            if shard is not None and current is not None and (current / shard).is_dir():
                _keep_folder(current / shard, folder / shard)
                parts.kept += 1
            else:
                _write_files(folder, files)
                parts.written += shard is not None
            if i == 0:
                _step("writing")
        version = json.loads(parts.site[SITE_POINTER])["version"]
        folder = folder.rename(versions / version)
        folder.chmod(0o755)
        (folder / BUILDING_MARK).unlink()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    _step("written")
    _switch(out, versions, version)
    _step("switched")
    sweep_site(out)
    return out


def _index_shards(fs, out: str, pointer_body: bytes | None) -> set[str]:
    """The shard folders the site whose pointer is ``pointer_body`` shows (none when unreadable)."""
    try:
        data = json.loads(pointer_body)["data"]
        return {s["path"] for s in json.loads(fs.cat_file(f"{out}/{data}/index.json"))["shards"]}
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return set()


def _write_fs(fs, out: str, parts: _Tally) -> str:
    # Shard folders first (one already complete is left as it is), then the versioned index, the
    # shell, and the pointer that switches readers over. The data version and shard folders the
    # pointer named before stay (pages opened before the switch still load them) until the next
    # build; older ones are removed.
    try:
        before = fs.cat_file(f"{out}/{SITE_POINTER}")
    except FileNotFoundError:
        before = None
    previous = json.loads(before).get("data", "").split("/")[-1] if before else None
    for shard, files in parts:
        if shard is not None:
            have = set(fs.find(f"{out}/{shard}")) if fs.exists(f"{out}/{shard}") else set()
            if {fs._strip_protocol(f"{out}/{rel}") for rel in files} <= have:
                parts.kept += 1
                continue
            parts.written += 1
        order = sorted(files, key=lambda rel: (rel == SITE_POINTER, not rel.startswith(("data/", "shards/")), rel))
        for rel in order:
            fs.pipe_file(f"{out}/{rel}", files[rel])
    data = json.loads(parts.site[SITE_POINTER])["data"]
    try:
        for old in fs.ls(f"{out}/data", detail=False):
            name = old.rstrip("/").split("/")[-1]
            if name not in (data.split("/")[-1], previous) and VERSION_RE.fullmatch(name):
                fs.rm(old, recursive=True)
    except FileNotFoundError:
        pass
    keep = _index_shards(fs, out, parts.site[SITE_POINTER]) | _index_shards(fs, out, before)
    try:
        for old in fs.ls(f"{out}/shards", detail=False):
            if f"shards/{old.rstrip('/').split('/')[-1]}" not in keep:
                fs.rm(old, recursive=True)
    except FileNotFoundError:
        pass
    return out
