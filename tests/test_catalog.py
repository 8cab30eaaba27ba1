"""The catalog: every artifact name in one module, and nothing else spelling one."""

import ast
import re
from pathlib import Path

import pytest

from sae_platform import catalog
from sae_platform.errors import ModelError, PlatformError, StorageError
from sae_platform.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
PREFIXES = (catalog.MODELS, catalog.ACTIVATIONS, catalog.SHUFFLE_SCRATCH, catalog.SHUFFLED, catalog.CHECKPOINTS,
            catalog.EVALUATIONS, catalog.SPARSE_PROBING, catalog.EXPORTS, catalog.REPORTS, catalog.FEATURES,
            catalog.BROWSER, catalog.NEURONPEDIA, catalog.STAGE_RECORDS, catalog.ABSORPTION, catalog.SYNTHETIC)
STORE_NAMES = (catalog.FIRST_STORE, "hooks/")
PATH_CALLS = ("path", "committed_names", "pointer", "resolve", "writing", "delete", "require")
# An artifact prefix as a path segment anywhere in a string ("features/…", "{root}/eval/…"),
# but not in prose ("the features of…"): the prefix must follow the start, a '/' or a placeholder.
ARTIFACT_PATH = re.compile(r"(?:^|[/\0])(?:" + "|".join(map(re.escape, PREFIXES)) + r")/")


def _leading_text(node: ast.AST) -> str | None:
    """The literal text a string constant or f-string starts with (None for other nodes)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "\0" for v in node.values)
    return None


def path_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string in ``source`` that spells an artifact path: one starting with an
    artifact prefix and '/', one naming a partition's zarr store, or a prefix passed alone as the
    first part of ``store.path(...)``. Docstrings are prose and not counted."""
    tree = ast.parse(source)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                  and n.body and isinstance(n.body[0], ast.Expr)}
    in_fstrings = _fstring_parts(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in PATH_CALLS and node.args:
            text = _leading_text(node.args[0])
            if text in PREFIXES:
                found.append((node.lineno, f"path({text!r}, ...)"))
        if _joins_a_prefix(node):
            found.append((node.lineno, "a path joined from an artifact prefix"))
        text = _leading_text(node)
        if text is None or id(node) in docstrings or id(node) in in_fstrings:
            continue
        if ARTIFACT_PATH.search(text) or any(s in text for s in STORE_NAMES):
            found.append((node.lineno, text.replace("\0", "{…}")))
    return found


def _joins_a_prefix(node: ast.AST) -> bool:
    """``os.path.join(root, "features", …)``, ``"/".join(["eval", …])`` or ``"eval" + "/" + …``."""
    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "join":
        parts = [a for arg in node.args for a in (arg.elts if isinstance(arg, ast.List | ast.Tuple) else [arg])]
        return any(_leading_text(p) in PREFIXES for p in parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _leading_text(node.left) in PREFIXES or _leading_text(node.right) in PREFIXES
    return False


def _fstring_parts(tree: ast.AST) -> set[int]:
    """ids of the constant pieces of every f-string in ``tree`` (judged as part of their f-string)."""
    return {id(v) for parent in ast.walk(tree) if isinstance(parent, ast.JoinedStr) for v in parent.values}


def test_path_literal_check_finds_the_kinds_it_should():
    source = ('a = f"features/{x}/tables"\nb = store.path("browser", x)\nc = "data.zarr"\n'
              'd = f"{v}/hooks/1.zarr"\ne = f"{root}/eval/{name}"\nf = os.path.join(root, "sae", name)\n'
              'g = "/".join(["shuffled", name])\nh = "reports" + "/" + name\n'
              'i = "a feature of the browser: see the eval report"\n')
    assert [line for line, _ in path_literals(source)] == [1, 2, 3, 4, 5, 6, 7, 8]


CATALOG = REPO / "sae_platform" / "catalog.py"


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for package in
                                        ("sae_platform", "assets", "resources", "jobs", "benchmarks")
                                        for p in (REPO / package).rglob("*.py") if p != CATALOG))
def test_no_artifact_path_outside_the_catalog(path):
    found = path_literals((REPO / path).read_text())
    assert not found, f"{path} spells artifact paths itself (ask sae_platform.catalog): {found}"


def test_hook_entry_spec_and_parse_round_trip():
    pair = catalog.HookEntry.parse("blocks.4.ln2.hook_normalized->  blocks.4.hook_mlp_out")
    assert pair == catalog.HookEntry("blocks.4.hook_mlp_out", "blocks.4.ln2.hook_normalized")
    assert pair.spec == "blocks.4.ln2.hook_normalized -> blocks.4.hook_mlp_out"
    assert catalog.HookEntry.parse(pair.spec) == pair
    assert catalog.HookEntry.parse("blocks.2.hook_resid_post").spec == "blocks.2.hook_resid_post"
    for bad in ("a -> b -> c", " -> b", ""):
        with pytest.raises(ModelError, match="neither a hook point nor"):
            catalog.HookEntry.parse(bad)


def test_store_index_is_recorded_not_parsed_from_names():
    assert catalog.hook_store_name("main", 0) == "main" and catalog.hook_store_name("main", 2) == "main.h2"
    assert catalog.shuffled_store_index({"name": "main.h2", "store_index": 0}) == 0  # the record wins
    assert catalog.shuffled_store_index({"name": "main", "store_index": 3}) == 3
    assert catalog.shuffled_store_index({"name": "main.h2"}) == 2  # stores shuffled before it was recorded
    assert catalog.store_group(0) == catalog.FIRST_STORE and catalog.store_group(2) == "hooks/2.zarr"
    with pytest.raises(StorageError):
        catalog.store_group(-1)


def test_names_refuse_unsafe_parts():
    with pytest.raises(Exception, match="not a safe path segment"):
        catalog.partition_name("../x")
    with pytest.raises(PlatformError, match="not a safe name"):
        catalog.contexts_name("a/b", 0)


def test_pinned_checkpoint_reads_what_writers_record(tmp_path):
    store = ArtifactStore(str(tmp_path))
    assert catalog.checkpoint_version(store, "s") is None
    with store.writing(catalog.checkpoint_name("s")) as version:
        store.write_json(f"{version}/cfg.json", {})
    current = catalog.checkpoint_version(store, "s")
    with store.writing(catalog.explanations_name("s", 0), **catalog.checkpoint_pin(current)):
        pass
    record = store.pointer(catalog.explanations_name("s", 0))
    assert catalog.pinned_checkpoint(record) == current and catalog.is_current(store, "s", record)
    with store.writing(catalog.checkpoint_name("s")) as version:  # a newer checkpoint: the record is stale
        store.write_json(f"{version}/cfg.json", {})
    assert not catalog.is_current(store, "s", record)
    assert catalog.pinned_checkpoint(None) is None
    assert catalog.pinned_checkpoint({"sae_checkpoint": {"version": "v-1"}}) == "v-1"  # an older lineage record


# -- names that become paths --------------------------------------------------------------------

ESCAPING_NAMES = ["../../escaped-sae", "..", "a/../b", "/etc/passwd", "sub/dir", "a\\b", "nul\0byte", "", ".hidden",
                  "-dash", "x" * 129, "caf\u00e9", "a..b", None, 7]


@pytest.mark.parametrize("bad", ESCAPING_NAMES, ids=repr)
def test_a_name_that_would_leave_its_folder_is_refused_everywhere_it_becomes_a_path(bad, tmp_path):
    """check_name is the one rule; every builder of a path from a user's name applies it, so
    ../../escaped-sae can never commit outside the artifact root."""
    from sae_platform.settings import SettingsError

    store = ArtifactStore(str(tmp_path / "root"))
    with pytest.raises(SettingsError, match="not a safe name") as error:
        catalog.check_name(bad, "somewhere.name")
    assert "somewhere.name" in error.value.problem and repr(bad) in error.value.problem
    assert catalog.SAFE_NAME_RULE in error.value.fix
    if bad is None:
        return  # features_folder(store, None) & co. mean every SAE's folder
    builders = [catalog.checkpoint_name, catalog.eval_name, catalog.export_name, catalog.shuffled_name,
                catalog.shuffle_plan_name, lambda n: catalog.tables_name(n, 0), lambda n: catalog.logits_name(n, 0),
                lambda n: catalog.contexts_name(n, 0), lambda n: catalog.features_folder(store, n),
                lambda n: catalog.browser_dir(store, n), lambda n: catalog.report_path(store, n, "x.png"),
                lambda n: catalog.lineage_record_path(store, n, 0), lambda n: catalog.partial_name(n, "key", 0),
                lambda n: catalog.shuffle_piece_name(n, "p", 0)]
    for build in builders:
        with pytest.raises(SettingsError, match="not a safe name"):
            build(bad)
    assert not (tmp_path / "escaped-sae").exists()


def test_good_names_pass_unchanged():
    for good in ("topk-16k-k32", "relu-4k", "lr=1e-3", "a.h1", "R2_d2", "x" * 128):
        assert catalog.check_name(good, "f") == good
        assert catalog.checkpoint_name(good) == f"sae/{good}"


def test_sweep_entry_names_are_checked_when_the_sweep_loads(tmp_path):
    from sae_platform.settings import SettingsError

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("good-one: {variant: topk, n_latents: 64, k: 4}\n"
                     "'../../escaped-sae': {variant: topk, n_latents: 64, k: 4}\n")
    with pytest.raises(SettingsError, match=r"sweep entry name in .*sweep.yaml = '\.\./\.\./escaped-sae' is not"):
        catalog.load_sweep(sweep)
    sweep.write_text("relu-4k: relu\n")
    with pytest.raises(SettingsError, match="not a mapping of settings"):
        catalog.load_sweep(sweep)
    assert list(catalog.load_sweep(Path(__file__).resolve().parents[1] / "config" / "sweep.yaml"))[0] == "topk-16k-k32"
