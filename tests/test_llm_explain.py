"""LLM explanations through a real local OpenAI-compatible HTTP server the test starts: a rule-based
"model" with known answers (a perfect explanation scores balanced accuracy 1, a model that always says
yes scores 0.5), the API key sent as a Bearer token and never shown, and the transformers back end
(the tiny Llama here; the embedded SmolLM2-135M-Instruct by default) served over the same path."""

import base64
import contextlib
import http.server
import json
import re
import threading
import time
import tracemalloc

import numpy as np
import polars as pl
import pytest

from resources import LLMExplainerResource
from sae_platform.errors import PlatformError
from sae_platform.llm_explain import (
    GIVE_UP_AFTER,
    MAX_ANSWER_BYTES,
    AnswerError,
    ChatClient,
    ExplainerError,
    LocalChat,
    detection_score,
    explain_feature,
    llm_explain_shard,
    mark,
    public_url,
    says_yes,
    serve_chat,
)
from sae_platform.tables import LLM_EXPLANATION_SCHEMA

KEY = "sk-test-0123456789"


class RuleModel:
    """Explains by the first marked token; detects by whether the explanation's word is in the text."""

    def __init__(self, always_yes=False):
        self.always_yes, self.seen = always_yes, []

    def chat(self, messages):
        self.seen.append(messages)
        user = messages[-1]["content"]
        if user.startswith("Excerpts:"):
            return re.search(r"<<(.+?)>>", user).group(1).strip() + "\nextra line"
        word = re.match(r"Explanation: (.*)\n", user).group(1)
        text = user.split("Text: ", 1)[1]
        return "Yes." if self.always_yes or word in text else "no"


@pytest.fixture
def rule_server():
    model = RuleModel()
    server, url = serve_chat(model, api_key=KEY)
    yield model, url
    server.shutdown()
    server.server_close()


def test_perfect_explanation_scores_one_through_http(rule_server):
    model, url = rule_server
    client = ChatClient(url, "rules", api_key=KEY)
    windows = [([" the", " winter", " night"], [0.0, 2.0, 0.0]), ([" cold", " winter"], [0.0, 1.0])]
    assert explain_feature(client, windows) == "winter"
    assert "<< winter>>" in model.seen[-1][-1]["content"]
    score = detection_score(client, "winter", [" in winter we", " a winter tale"], [" summer", " spring", " autumn"])
    assert score["balanced_accuracy"] == 1.0 and score["n_negative"] == 3
    wrong = detection_score(client, "summer", [" in winter we", " a winter tale"], [" summer", " spring"])
    assert wrong["balanced_accuracy"] == 0.25        # tpr 0, tnr 0.5


def test_always_yes_is_chance():
    server, url = serve_chat(RuleModel(always_yes=True))
    try:
        score = detection_score(ChatClient(url, "rules"), "x", ["a", "b"], ["c", "d"])
        assert score["balanced_accuracy"] == 0.5 and score["true_positive_rate"] == 1.0
    finally:
        server.shutdown()
        server.server_close()


def test_key_is_sent_never_shown_and_errors_say_what_to_fix(rule_server):
    _, url = rule_server
    client = ChatClient(url, "rules", api_key=KEY)
    assert KEY not in repr(client) and KEY not in str(client) and "***" in repr(client)
    with pytest.raises(PlatformError, match="HTTP 401") as raised:
        ChatClient(url, "rules", api_key="wrong").chat([{"role": "user", "content": "hi"}])
    assert "wrong" not in str(raised.value)
    with pytest.raises(PlatformError, match="cannot be reached"):
        ChatClient("http://127.0.0.1:9/v1", "m", timeout_s=2).chat([{"role": "user", "content": "hi"}])
    with pytest.raises(PlatformError, match="not an http"):
        ChatClient("file:///etc/passwd", "m")
    with pytest.raises(PlatformError, match="activating and non-activating"):
        detection_score(client, "x", [], ["a"])


def test_helpers():
    assert mark([" a", " b"], [0.0, 1.5]) == " a<< b>>"
    assert says_yes("Yes, it does") and says_yes("  yes") and not says_yes("No.") and not says_yes("")


def test_transformers_backend_through_the_same_http_path(tiny_model_dir):
    local = LocalChat(str(tiny_model_dir), max_new_tokens=6)
    server, url = serve_chat(local, model_name="tiny")
    try:
        client = ChatClient(url, "tiny")
        answer = client.chat([{"role": "user", "content": "To be, or not to be"}])
        assert isinstance(answer, str)
        assert answer == local.chat([{"role": "user", "content": "To be, or not to be"}])   # greedy: same text
        score = detection_score(client, "anything", ["To be"], ["or not"])
        assert 0.0 <= score["balanced_accuracy"] <= 1.0
    finally:
        server.shutdown()
        server.server_close()


# -- an explainer that misbehaves cannot hurt the run or leak the key ------------------------------

@contextlib.contextmanager
def scripted_server(respond):
    """A real local HTTP server whose every request is answered by ``respond(handler)``; yields its
    /v1 URL and the requests it got (method, path, Authorization header)."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _any(self):
            seen.append((self.command, self.path, self.headers.get("Authorization")))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                respond(self)
            except OSError:  # the client hung up, as it should on an endless answer
                pass

        do_GET = do_POST = _any

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()


def answer(handler, body: bytes, content_type="application/json", status=200, headers=()):
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in headers:
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def completion(content) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_so_the_key_never_reaches_another_server(status):
    with scripted_server(lambda h: answer(h, completion("stolen"))) as (elsewhere, stolen), \
            scripted_server(lambda h: answer(h, b"", headers=[("Location", f"{elsewhere}/chat/completions")],
                                             status=status)) as (url, asked):
        with pytest.raises(ExplainerError, match=f"HTTP {status}, a redirect to another server") as raised:
            ChatClient(url, "m", api_key=KEY).chat(HI)
        assert elsewhere.removesuffix("/v1") in str(raised.value) and KEY not in str(raised.value)
        assert asked == [("POST", "/v1/chat/completions", f"Bearer {KEY}")] and stolen == []
    with scripted_server(lambda h: answer(h, b"", status=302, headers=[("Location", "/v2/chat/completions")])) as \
            (url, asked):  # the same server: still not followed (base_url names the endpoint)
        with pytest.raises(ExplainerError, match="redirect to elsewhere on the same server"):
            ChatClient(url, "m", api_key=KEY).chat(HI)
        assert len(asked) == 1


def drip(where: str):
    """A server that sends its answer (or its headers) one byte every 20 ms, for at most 6 s."""
    def respond(handler):
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 300\r\n\r\n"
        if where == "body":
            handler.wfile.write(head)
            head = b""
        for byte in (head + b"[" * 300):
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(0.02)
    return respond


@pytest.mark.parametrize("where", ["headers", "body"])
def test_timeout_bounds_the_whole_answer_not_each_read(where):
    with scripted_server(drip(where)) as (url, _):
        began = time.monotonic()
        with pytest.raises(AnswerError, match=r"no complete answer within timeout_s=1 s"):
            ChatClient(url, "m", timeout_s=1).chat(HI)
        assert time.monotonic() - began < 2.0


def endless(handler):
    """A 1 GB answer with no length, written as fast as the client reads."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Connection", "close")
    handler.end_headers()
    block = b" " * (1 << 16)
    for _ in range((1 << 30) // len(block)):
        handler.wfile.write(block)


def test_a_huge_answer_is_cut_at_one_megabyte_in_bounded_memory():
    with scripted_server(endless) as (url, _):
        tracemalloc.start()
        try:
            with pytest.raises(AnswerError, match="an answer over 1,048,576 bytes; it was cut"):
                ChatClient(url, "m", timeout_s=20).chat(HI)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 4 * MAX_ANSWER_BYTES, peak     # on main: the whole 1 GB is read into memory
    declared = b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n"
    with scripted_server(lambda h: h.wfile.write(declared)) as (url, _):   # refused before reading
        with pytest.raises(AnswerError, match="over 1,048,576 bytes"):
            ChatClient(url, "m", timeout_s=20).chat(HI)


@pytest.mark.parametrize(("body", "content_type", "says"), [
    (b"<html><body>Sign in</body></html>", "text/html", r"answered text/html \(33 bytes\), not JSON"),
    (b"\xff\xfe not text", "application/json", "not JSON"),
    (completion(None), "application/json", r"no text in choices\[0\].message.content \(it sent null\)"),
    (completion(""), "application/json", r"it sent an empty string"),
    (completion("  \n "), "application/json", r"it sent an empty string"),
    (completion(["a"]), "application/json", r"it sent a list"),
    (b'{"choices": []}', "application/json", r"it sent nothing"),
    (b"null", "application/json", r"it sent nothing"),
    (b"[" * 200_000 + b"]" * 200_000, "application/json", "nested too deeply"),
    (b'{"choices": [{"message": {"content": "a \\ud800 b"}}]}', "application/json", "a lone surrogate"),
])
def test_a_malformed_answer_is_a_clear_error_never_the_explanation_none(body, content_type, says):
    with scripted_server(lambda h: answer(h, body, content_type)) as (url, _):
        with pytest.raises(AnswerError, match=says) as raised:
            ChatClient(url, "m").chat(HI)
    assert "How to fix" in str(raised.value)


@pytest.mark.parametrize("key", ["sk-SECRET123\n", "sk-SECRET 123", "sk-SECRÉT123"])
def test_a_key_a_header_cannot_carry_is_refused_without_showing_it(key):
    """A key with a line break (an env file's), a space or non-ASCII: refused when the client is
    made, never a raw header error whose message would carry the key into the run's log."""
    if key.strip() == "sk-SECRET123":
        assert ChatClient("http://127.0.0.1:9/v1", "m", api_key=key).api_key == "sk-SECRET123"  # stripped
        return
    with pytest.raises(PlatformError, match="holds characters an HTTP header cannot carry") as raised:
        ChatClient("http://127.0.0.1:9/v1", "m", api_key=key)
    assert "SECR" not in str(raised.value)


def test_an_empty_explanation_is_an_error_not_stored():
    class Silent:
        def chat(self, messages):
            return "  "
    with pytest.raises(AnswerError, match="wrote no explanation"):
        explain_feature(Silent(), [([" a"], [1.0])])


def test_credentials_in_base_url_and_the_key_never_appear_in_messages():
    secret_url = "http://alice:pa55word@127.0.0.1:9/v1?api-key=qu3ry"
    secrets = ("pa55word", "alice", "qu3ry", KEY)
    shown = []
    with pytest.raises(ExplainerError, match="cannot be reached") as raised:
        ChatClient(secret_url, "m", api_key=KEY, timeout_s=2).chat(HI)
    shown += [str(raised.value), repr(ChatClient(secret_url, "m", api_key=KEY))]
    with pytest.raises(PlatformError, match="not an http") as raised:
        ChatClient("ftp://alice:pa55word@host/v1", "m")
    shown.append(str(raised.value))
    target = "http://alice:pa55word@127.0.0.2:1/steal?api-key=qu3ry"
    with scripted_server(lambda h: answer(h, b"", status=302, headers=[("Location", target)])) as (url, asked):
        with pytest.raises(ExplainerError, match=r"another server \(http://127.0.0.2:1/steal\?…\)") as raised:
            ChatClient(url.replace("://", "://alice:pa55word@"), "m").chat(HI)
        shown.append(str(raised.value))
        assert asked[0][2] == "Basic " + base64.b64encode(b"alice:pa55word").decode()  # the URL's user, as HTTP auth
    for server in (url, secret_url):
        shown.append(LLMExplainerResource(enabled=True, base_url=server).describe())
    assert shown and not [s for s in shown for secret in secrets if secret in s], shown
    assert public_url(secret_url) == "http://127.0.0.1:9/v1?…"


class Codes:
    """metrics.HeldoutCodes' fields, for 3 contexts of 8 tokens: feature f fires on tokens 8f+1, 8f+2."""

    def __init__(self, features=(0, 1, 2)):
        self.tokens = np.arange(24).reshape(3, 8)
        self.mask = np.ones((3, 8), dtype=bool)
        self.features = np.repeat(np.array(features), 2)
        self.positions = np.array([p for f in features for p in (8 * f + 1, 8 * f + 2)])


def top_windows(features=(0, 1, 2)):
    return pl.DataFrame({"feature": list(features), "kind": ["top"] * len(features), "rank": [0] * len(features),
                         "token_strs": [[" x", f" w{f}"] for f in features], "acts": [[0.0, 1.0]] * len(features)})


class Tokenizer:
    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


class Flaky:
    """Explains feature f as w<f>; says nothing about those in ``silent``."""

    def __init__(self, silent=()):
        self.silent = silent

    def chat(self, messages):
        word = re.search(r"<< (w\d+)>>", messages[-1]["content"])
        if word:
            if int(word.group(1)[1:]) in self.silent:
                raise AnswerError("the chat endpoint http://h/v1 sent no text", "fix it")
            return word.group(1)
        return "no"


def test_one_unusable_answer_fails_its_feature_and_the_others_go_on():
    rows = llm_explain_shard(Flaky(silent={1}), top_windows(), Codes(), Tokenizer(), 0, 3, n_features=3,
                             n_examples=2, width=2)
    by_feature = {r["feature"]: r for r in rows}
    assert by_feature[1]["error"] == "the chat endpoint http://h/v1 sent no text"
    assert by_feature[1]["explanation"] is None and by_feature[1]["balanced_accuracy"] is None
    assert by_feature[0]["explanation"] == "w0" and by_feature[0]["error"] is None
    assert by_feature[2]["balanced_accuracy"] is not None
    assert pl.DataFrame(rows, schema=LLM_EXPLANATION_SCHEMA).height == 3


def test_a_shard_where_every_answer_fails_stops_after_a_few_and_fails():
    backend = Flaky(silent=set(range(5)))
    calls = []
    backend.chat = lambda messages, chat=backend.chat: calls.append(1) or chat(messages)
    with pytest.raises(ExplainerError, match=f"none of the {GIVE_UP_AFTER} features tried could be explained"):
        llm_explain_shard(backend, top_windows(range(5)), Codes(range(5)), Tokenizer(), 0, 5, n_features=5,
                          n_examples=2, width=2)
    assert len(calls) == GIVE_UP_AFTER    # the endpoint is broken: the other features are not tried
