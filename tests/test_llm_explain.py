"""LLM explanations through a real local OpenAI-compatible HTTP server the test starts: a rule-based
"model" with known answers (a perfect explanation scores balanced accuracy 1, a model that always says
yes scores 0.5), the API key sent as a Bearer token and never shown, and the transformers back end
(the tiny Llama here; the embedded SmolLM2-135M-Instruct by default) served over the same path."""

import re

import pytest

from sae_platform.errors import PlatformError
from sae_platform.llm_explain import (
    ChatClient,
    LocalChat,
    detection_score,
    explain_feature,
    mark,
    says_yes,
    serve_chat,
)

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
