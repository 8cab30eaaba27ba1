"""`sae-platform verify [ARTIFACT ...]`: every committed artifact's bytes re-hashed against what its
writer recorded at commit (storage.ArtifactStore.verify); no Dagster, no torch."""

import sys

from jobs.settings import Settings
from sae_platform.errors import StorageError


def _artifacts(store, asked: list[str]) -> list[str]:
    """The committed artifacts named (each an artifact name such as ``activations/b0`` or a prefix
    such as ``sae``: every artifact under it), or every committed artifact when none is named."""
    if not asked:
        return store.committed_artifacts()
    names = []
    for name in asked:
        found = store.committed_artifacts(name)
        if not found:
            raise StorageError(f"nothing is committed at {name!r} under {store.url(store.root)}",
                               "name an artifact as sae-platform status lists it (e.g. activations/<key>, "
                               "sae/<run>), or a prefix (activations, sae, models), or nothing for everything")
        names += found
    return list(dict.fromkeys(names))


def cmd_verify(args) -> int:
    from tqdm import tqdm

    from sae_platform.storage import open_store

    settings = Settings.from_env()
    store = open_store(settings.root_url, settings.s3_endpoint_url)
    names = _artifacts(store, args.artifacts)
    total = sum(int((store.pointer(n).get("checksums") or {}).get("bytes", 0)) for n in names)
    results = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="verifying", file=sys.stderr) as bar:
        for name in names:
            results.append(store.verify(name, progress=bar.update))
    damaged = [r for r in results if r["status"] == "damaged"]
    unrecorded = [r for r in results if r["status"] == "unrecorded"]
    for result in results:
        if result["status"] == "damaged":
            print(f"DAMAGED {result['name']} ({result['version']}):")
            for problem in result["problems"]:
                print(f"    {problem}")
    for result in unrecorded:
        print(f"not checked {result['name']} ({result['version']}): committed before checksums were recorded; "
              "re-run the stage that writes it to record them")
    print(f"{len(results) - len(damaged) - len(unrecorded)} artifact(s) intact, {len(damaged)} damaged, "
          f"{len(unrecorded)} without checksums; {sum(r['bytes'] for r in results):,} bytes hashed")
    if damaged:
        from sae_platform.catalog import rebuild_fix

        print("How to fix each damaged artifact:")
        for result in damaged:
            print(f"  {result['name']}: {rebuild_fix(store, result['name'])}")
    return 1 if damaged else 0
