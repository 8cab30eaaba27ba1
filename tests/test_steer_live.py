"""Steering on the live server (``POST /api/steer``): streamed JSON lines equal to the core's
continuations, bounds answered with 400, one request at a time (429), and the feature page's
steer panel in Chromium with a planted feature whose token the steered column shows."""

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

from sae_platform.live import MAX_NEW_TOKENS, LiveEncoder, serve_live_in_thread
from sae_platform.sae import build_sae
from sae_platform.steering import steer
from sae_platform.tokens import token_display_strings
from tests.test_browser import chromium  # noqa: F401  (fixture)
from tests.test_live import live_site  # noqa: F401  (fixture)

HOOK = "blocks.3.hook_resid_post"   # the last block: the planted direction goes straight to the logits
PLANTED = 7
PROMPT = "To be, or not to be"


@pytest.fixture
def planted_encoder(tiny_hooked):
    """A 300-latent SAE (the synthetic site's features) whose latent 7 writes the unembedding
    direction of the token " x": steering with it promotes that token."""
    torch.manual_seed(0)
    sae = build_sae("topk", tiny_hooked.d_model, 300, k=4)
    token = tiny_hooked.tokenizer(" fox", add_special_tokens=False)["input_ids"][-1]
    w_u = tiny_hooked.model.lm_head.weight.detach()[token]
    with torch.no_grad():
        sae.W_dec[PLANTED] = w_u / w_u.norm()
    encoder = LiveEncoder(tiny_hooked, sae, HOOK, max_tokens=12, checkpoint_version="v-test")
    encoder.planted_token = token
    return encoder


@pytest.fixture
def steer_live(live_site, planted_encoder):  # noqa: F811
    server, url = serve_live_in_thread(live_site, planted_encoder)
    yield url
    server.shutdown()
    server.server_close()


def _open(url, body: dict):
    request = urllib.request.Request(url + "api/steer", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=60)


def _post(url, body: dict):
    try:
        with _open(url, body) as r:
            return r.status, [json.loads(line) for line in r.read().decode().splitlines()]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_streamed_lines_are_the_cores_continuations(steer_live, planted_encoder, tiny_hooked):
    body = {"prompt": PROMPT, "features": [[PLANTED, 20.0]], "method": "additive", "max_new_tokens": 10}
    status, lines = _post(steer_live, body)
    assert status == 200
    head, steps, done = lines[0], lines[1:-1], lines[-1]
    ids = tiny_hooked.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert head["checkpoint_version"] == "v-test" and head["prompt_tokens"] == len(ids) and head["method"] == "additive"
    want = list(steer(tiny_hooked, planted_encoder.sae, ids, [(PLANTED, 20.0)], "additive", 10, hook_point=HOOK))
    shown = lambda t: None if t is None else token_display_strings(tiny_hooked.tokenizer, [t])[0]  # noqa: E731
    assert [[s["baseline"], s["steered"]] for s in steps] == [[shown(b), shown(s)] for b, s in want]
    assert done["done"] and done["steered_text"] == tiny_hooked.tokenizer.decode([s for _, s in want if s is not None])
    limits = json.loads(urllib.request.urlopen(steer_live + "api/limits", timeout=10).read())
    assert limits["max_new_tokens"] == MAX_NEW_TOKENS and limits["steer_methods"] == ["additive", "orthogonal", "cap"]


def test_bounds_and_bad_requests_get_400_naming_the_problem(steer_live):
    ok = {"prompt": PROMPT, "features": [[PLANTED, 1.0]]}
    cases = [({"max_new_tokens": MAX_NEW_TOKENS + 1}, f"1..{MAX_NEW_TOKENS}"),
             ({"prompt": "to be " * 20}, "at most 12 are steered"), ({"prompt": "x" * 4001}, "at most 4000"),
             ({"method": "boost"}, "unknown steering method"), ({"features": [[300, 1.0]]}, "not a latent"),
             ({"features": [[1, "strong"]]}, "finite number"), ({"prompt": 5}, "'prompt' must be a string"),
             ({"condition": {"feature": 3}}, "condition"), ({"condition": {"feature": 3, "threshold": None}},
                                                            "threshold must be a finite number")]
    for change, message in cases:
        status, answer = _post(steer_live, {**ok, **change})
        assert status == 400 and message in answer["error"], (change, answer)
    assert _post(steer_live, ok)[0] == 200          # the server keeps answering


def test_one_steering_request_at_a_time_the_next_gets_429_until_it_ends(steer_live):
    body = {"prompt": PROMPT, "features": [[PLANTED, 20.0]], "max_new_tokens": MAX_NEW_TOKENS}
    first = _open(steer_live, body)
    try:
        assert json.loads(first.readline())["checkpoint_version"] == "v-test"   # generating: the model is held
        status, answer = _post(steer_live, body)
        assert status == 429 and "another request" in answer["error"]
        rest = [json.loads(line) for line in first.read().decode().splitlines()]
        assert rest[-1]["done"]
    finally:
        first.close()
    ready = threading.Event()
    for _ in range(50):                              # the handler releases the model as its response ends
        status, _ = _post(steer_live, {**body, "max_new_tokens": 2})
        if status == 200:
            ready.set()
            break
        ready.wait(0.1)
    assert ready.is_set()


def test_steer_panel_in_chromium_shows_the_planted_token_more_often(chromium, steer_live, planted_encoder,  # noqa: F811
                                                                    tiny_hooked):
    """The feature page of the planted latent: the panel's default strength is the feature's max
    activation; at strength 20 the steered column shows the planted token more often than the
    baseline column (measured: 0 of 16 without, 16 of 16 steered)."""
    ctx = chromium.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    problems = []
    pg.on("pageerror", lambda e: problems.append(str(e)))
    pg.set_default_timeout(30000)
    try:
        pg.goto(steer_live)
        pg.wait_for_selector("#live-link")
        pg.goto(steer_live + f"#/feature/{PLANTED}")
        pg.wait_for_selector("#steer")
        shown_max = pg.inner_text("#stat-max").split("\n")[-1].strip()
        assert float(pg.input_value("#steer-strength")) == pytest.approx(float(shown_max), rel=5e-3)  # shown rounded
        pg.fill("#steer-prompt", PROMPT)
        pg.fill("#steer-strength", "20")
        pg.fill("#steer-tokens", "16")
        pg.click("#steer-go")
        pg.wait_for_selector("#steer-status:has-text('Done')")
        baseline = pg.locator("#steer-baseline .tok").all_inner_texts()
        steered = pg.locator("#steer-steered .tok").all_inner_texts()
        assert baseline and steered
        token = token_display_strings(tiny_hooked.tokenizer, [planted_encoder.planted_token])[0]
        assert steered.count(token) > baseline.count(token) and steered.count(token) >= 8, (baseline, steered)
        assert not problems, problems
    finally:
        ctx.close()


def test_no_steer_panel_without_the_live_server(chromium, live_site):  # noqa: F811
    from tests.test_browser import _served_page

    for pg in _served_page(chromium, live_site):
        pg.goto(pg.base_url + f"#/feature/{PLANTED}")
        pg.wait_for_selector("h1:has-text('Feature')")
        assert pg.locator("#steer").count() == 0 and not pg.problems, pg.problems


def test_cli_prints_both_continuations_of_the_committed_checkpoint(store, tiny_hooked, tiny_model_dir, tmp_path):
    """`sae-platform steer` (a subprocess, the deployment's model and store) prints the baseline
    and the steered continuation the core gives for the committed checkpoint; a --feature without
    its --strength is refused naming the fix."""
    import os
    import subprocess
    import sys

    from conftest import REPO, tiny_run_config

    from sae_platform.catalog import checkpoint_version
    from sae_platform.trainer import load_sae
    from tests.test_live import _trained_twice

    _trained_twice(store, tiny_hooked)
    run_config = tmp_path / "run.yaml"
    run_config.write_text(tiny_run_config(tiny_model_dir))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SAE_PLATFORM_")},
           "SAE_PLATFORM_ROOT": store.root_url, "SAE_PLATFORM_RUN_CONFIG": str(run_config),
           "DAGSTER_HOME": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "jobs.cli", "steer", "--sae", "run", "--device", "cpu", PROMPT]
    done = subprocess.run([*cli, "--feature", "7", "--strength", "20", "--feature", "9", "--strength", "-4",
                           "--max-new-tokens", "6"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    sae = load_sae(store, "run")[0]
    ids = tiny_hooked.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    pairs = list(steer(tiny_hooked, sae, ids, [(7, 20.0), (9, -4.0)], "additive", 6))
    decode = tiny_hooked.tokenizer.decode
    assert checkpoint_version(store, "run") in done.stdout and "#7 x 20, #9 x -4" in done.stdout
    assert f"--- without ---\n{PROMPT}{decode([b for b, _ in pairs if b is not None])}\n" in done.stdout
    assert f"--- steered ---\n{PROMPT}{decode([s for _, s in pairs if s is not None])}\n" in done.stdout
    bad = subprocess.run([*cli, "--feature", "7", "--feature", "8", "--strength", "1"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "give one strength" in bad.stderr
