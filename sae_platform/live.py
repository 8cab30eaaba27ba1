"""Text in, features out: the feature browser with a live endpoint (``sae-platform serve``).

The server serves a built browser site (as ``sae_platform.browser.server.serve`` does, same security
headers) and answers ``POST /api/features`` with a JSON body ``{"text": "...", "feature": id}``
(``feature`` optional): the text is tokenized (with the model's start token in front, as the
training contexts have), run through the base model up to the SAE's own hook point
(``LiveEncoder.hook_point``; a transcoder's input ``input_hook_point``; taken from
``activations.sae_hook_entry`` of the checkpoint version loaded, where its training rows were read)
and encoded by the SAE. The answer::

    {"checkpoint_version": "v-…",          the checkpoint that encoded the text
     "tokens": [" The", ...],              display strings
     "features": [[[id, act], ...], ...],  per token its active latents, strongest first, at most ``top``
     "n_active": [4, ...],                 per token how many latents were active (> len(features[t]): cut)
     "top_features": [[id, total, max, n_tokens], ...],  the latents most active on the whole text,
                                           largest summed activation first, at most ``top_features``
     "n_active_features": 57, "top_features_truncated": true,
     "feature": id, "feature_acts": [act per token],      the heat map of the chosen feature
                                           (the request's ``feature``; default the first of top_features)
     "truncated": false, "max_tokens": 256, "max_chars": 4000}

With TopK every token has k active latents, so the per-token lists alone do not show what the text
is about; the whole-text ranking and one feature's heat map do (Neuronpedia's search by inference).

``GET /api/limits`` answers ``{"max_chars", "max_tokens", "top", "top_features",
"checkpoint_version"}``: the page's probe (it offers the live page only when this answers) and
the one source of the textarea's ``maxlength`` (``MAX_CHARS`` unless the server was told otherwise).

The server follows the site it serves (``SiteEncoder``): each request checks, at most every
``check_every_s`` seconds, the checkpoint version the site's ``site.json`` pins (a ``stat``, and a
read only when the file changed); when a rebuild switched it, the SAE of that version is loaded
before the request is answered, so the text is encoded by the weights the linked pages describe.

Bounds: the request body is at most ``MAX_BODY`` bytes, the text at most ``max_chars`` characters
and ``max_tokens`` tokens (longer input is cut and ``truncated`` says so), at most ``top`` latents
per token. Requests never name files: the endpoint reads only its JSON body, and GET requests go
to the static site's directory handler (no listing outside it). One request runs the model at a
time (a lock). The server binds 127.0.0.1 unless told otherwise and checks every request's ``Host``
header (``browser.server``); it binds before any model is loaded, so a port in use fails at once.
A body that is not JSON, nested too deeply, or whose text holds a lone surrogate gets 400 with the
reason; the server keeps answering.

``POST /api/steer`` (``sae_platform.steering``) takes ``{"prompt": "...", "features": [[id, strength],
...], "method": "additive" | "orthogonal" | "cap", "max_new_tokens": 32, "condition": {"feature": id,
"threshold": act} (optional)}`` and streams JSON lines (``application/x-ndjson``) as the model
generates: first ``{"checkpoint_version", "prompt_tokens", "method", "features", "condition",
"max_new_tokens"}``, then one ``{"baseline": " tok", "steered": " tok"}`` per step (null for a side
that has ended), then ``{"done": true, "baseline_text", "steered_text"}`` (or ``{"error"}`` when
the model fails midway). Bounded like the live text: the prompt at most ``max_chars`` characters
and ``max_tokens`` tokens and ``max_new_tokens`` at most ``max_new_tokens_cap`` (longer: 400, naming
the bound), and one steering request at a time: the model is held for the whole generation, and a
request that finds it busy gets 429 at once. ``/api/limits`` also answers ``max_new_tokens`` and
``steer_methods``: the feature page shows its steer panel only when they are there.
"""

import http.server
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sae_platform.browser.generate import SITE_POINTER
from sae_platform.browser.server import LIMITS_PATH, make_server, serve_in_thread, serve_until_interrupted
from sae_platform.catalog import checkpoint_version, pinned_checkpoint
from sae_platform.errors import PlatformError, StorageError
from sae_platform.hooks import sae_hook_points
from sae_platform.steering import METHODS, Condition, check_method, check_number, steer
from sae_platform.tokens import token_display_strings

MAX_BODY = 64 * 1024
MAX_CHARS = 4000      # the longest text answered, in characters: the server's bound and the page's maxlength
TOP_FEATURES = 20     # latents listed for the whole text
MAX_NEW_TOKENS = 64   # the most tokens one steering request generates (per side)
API_PATH = "/api/features"
STEER_PATH = "/api/steer"


class Busy(PlatformError):
    """The model is running another steering request (answered 429)."""


@dataclass
class LiveEncoder:
    """The base model (``HookedModel``) and the SAE, ready to answer texts. The SAE encodes the
    value at ``hook_point`` (a transcoder: at ``input_hook_point``, its input); a name the model
    lacks or a wrong pairing is a ModelError (``hooks.sae_hook_points``). ``checkpoint_version``:
    the checkpoint the SAE was loaded from, named in every answer."""

    hooked: object
    sae: object
    hook_point: str
    input_hook_point: str | None = None
    max_tokens: int = 256
    max_chars: int = MAX_CHARS
    top: int = 16
    top_features: int = TOP_FEATURES
    checkpoint_version: str | None = None
    max_new_tokens_cap: int = MAX_NEW_TOKENS

    def __post_init__(self):
        self._lock = threading.Lock()
        self.reads = sae_hook_points(self.hooked.model, self.hook_point, self.input_hook_point,
                                     self.sae.is_transcoder)[1].name

    def current(self) -> "LiveEncoder":
        """Itself (a ``SiteEncoder`` answers with the encoder of the site's checkpoint)."""
        return self

    def limits(self) -> dict:
        """What the page needs before it sends a text: the bounds and the checkpoint version."""
        return {"max_chars": self.max_chars, "max_tokens": self.max_tokens, "top": self.top,
                "top_features": self.top_features, "checkpoint_version": self.checkpoint_version,
                "max_new_tokens": self.max_new_tokens_cap, "steer_methods": list(METHODS)}

    def steering(self, request: dict) -> Iterator[dict]:
        """The JSON lines of ``POST /api/steer`` for ``request`` (the module docstring). The request
        is checked and the model taken before the first line: PlatformError naming the bad field,
        ``Busy`` when another steering request holds the model. The model is held until the
        iterator ends or is closed."""
        prompt = _checked_text(request.get("prompt"), "prompt")
        if len(prompt) > self.max_chars:
            raise PlatformError(f"the prompt has {len(prompt)} characters; at most {self.max_chars} are steered",
                                "send a shorter prompt")
        ids = [int(i) for i in self.hooked.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        if len(ids) > self.max_tokens:
            raise PlatformError(f"the prompt has {len(ids)} tokens; at most {self.max_tokens} are steered",
                                "send a shorter prompt")
        n_new = request.get("max_new_tokens", 32)
        if isinstance(n_new, bool) or not isinstance(n_new, int) or not 1 <= n_new <= self.max_new_tokens_cap:
            raise PlatformError(f"max_new_tokens must be an integer in 1..{self.max_new_tokens_cap}, got {n_new!r}",
                                f"ask for at most {self.max_new_tokens_cap} tokens")
        condition = _condition(request.get("condition"))
        method = check_method(request.get("method", "additive"))
        continuations = steer(self.hooked, self.sae, ids, request.get("features"), method, n_new, condition,
                              hook_point=self.hook_point, input_hook_point=self.input_hook_point)
        if not self._lock.acquire(blocking=False):
            continuations.close()
            raise Busy("the model is answering another request", "wait for it to finish, then send again")
        return _Held(self._steered_lines(continuations, request.get("features"), method, n_new, condition, len(ids)),
                     continuations, self._lock)

    def _steered_lines(self, continuations, features, method, n_new, condition, n_prompt) -> Iterator[dict]:
        try:
            yield {"checkpoint_version": self.checkpoint_version, "prompt_tokens": n_prompt, "method": method,
                   "features": features, "max_new_tokens": n_new,
                   "condition": None if condition is None else vars(condition)}
            sides: tuple[list[int], list[int]] = ([], [])
            for step in continuations:
                for side, token in zip(sides, step, strict=True):
                    side.extend([] if token is None else [token])
                yield {name: None if token is None else token_display_strings(self.hooked.tokenizer, [token])[0]
                       for name, token in zip(("baseline", "steered"), step, strict=True)}
            yield {"done": True, **{f"{name}_text": self.hooked.tokenizer.decode(side)
                                    for name, side in zip(("baseline", "steered"), sides, strict=True)}}
        finally:
            continuations.close()

    @torch.inference_mode()
    def features(self, text: str, feature: int | None = None) -> dict:
        """The answer for ``text`` (see the module docstring); ``feature``: the latent whose
        per-token activations the answer carries (default: the most active on the whole text).
        PlatformError for a text that is not a string or not Unicode, a feature outside the SAE."""
        text = _checked_text(text)
        feature = self._checked_feature(feature)
        truncated = len(text) > self.max_chars
        text = text[: self.max_chars]
        ids = self.hooked.tokenizer(text, add_special_tokens=False)["input_ids"]
        truncated = truncated or len(ids) > self.max_tokens
        ids = [int(i) for i in ids[: self.max_tokens]]
        values, indices = self._codes(ids)
        per_token = [_strongest(v, i, self.top) for v, i in zip(values, indices, strict=True)]
        ranking = _whole_text_ranking(values, indices)
        if feature is None and ranking:
            feature = ranking[0][0]
        heat = [] if feature is None else [_rounded(float(v[i == feature].sum())) for v, i in zip(values, indices,
                                                                                                   strict=True)]
        return {"checkpoint_version": self.checkpoint_version,
                "tokens": token_display_strings(self.hooked.tokenizer, ids) if ids else [], "features": per_token,
                "n_active": [int((v > 0).sum()) for v in values],
                "top_features": ranking[: self.top_features], "n_active_features": len(ranking),
                "top_features_truncated": len(ranking) > self.top_features,
                "feature": feature, "feature_acts": heat,
                "truncated": truncated, "max_tokens": self.max_tokens, "max_chars": self.max_chars}

    def _checked_feature(self, feature) -> int | None:
        n = int(self.sae.config["n_latents"])
        if feature is None:
            return None
        if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < n:
            raise PlatformError(f"the request's 'feature' {feature!r} is not a latent of this SAE (0..{n - 1})",
                                'send {"text": "...", "feature": ID} with an integer ID, or leave "feature" out')
        return feature

    def _codes(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The SAE's codes of each token: values and latent ids, [tokens, K] each (K 0 for no tokens)."""
        if not ids:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
        with self._lock:
            x = self.hooked.read(torch.tensor([[self.hooked.start_token_id, *ids]]), (self.reads,))[self.reads][0, 1:]
            sae_device = self.sae.W_dec.device
            with torch.autocast(sae_device.type, enabled=False):
                codes = self.sae.encode(x.to(sae_device))
        return codes.values.float().cpu().numpy(), codes.indices.cpu().numpy()


class _Held:
    """The lines of a steering request, holding the model's lock until they end or are closed
    (even if never read: a client gone before the first line must not keep the model)."""

    def __init__(self, lines: Iterator[dict], continuations, lock: threading.Lock):
        self.lines, self.continuations, self.lock = lines, continuations, lock

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        try:
            return next(self.lines)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Closes the lines and the continuations (the splice hooks come off the model), then
        frees the model; a second call does nothing."""
        if self.lock is None:
            return
        try:
            self.lines.close()
            self.continuations.close()
        finally:
            self.lock.release()
            self.lock = None


def _rounded(value: float) -> float:
    return float(f"{value:.4g}")  # 4 significant digits: what the page shows


def _condition(condition) -> Condition | None:
    """The request's ``condition`` ({"feature": id, "threshold": act} or absent) as a Condition."""
    if condition is None:
        return None
    if not isinstance(condition, dict) or set(condition) != {"feature", "threshold"}:
        raise PlatformError(f"the request's 'condition' {condition!r} is not {{\"feature\": id, \"threshold\": act}}",
                            'send "condition": {"feature": 12, "threshold": 0.5}, or leave it out')
    return Condition(condition["feature"], check_number(condition["threshold"], "the condition threshold"))


def _checked_text(text, field: str = "text") -> str:
    if not isinstance(text, str):
        raise PlatformError(f"the request's {field!r} must be a string", f'send {{"{field}": "your text"}}')
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PlatformError(f"the request's {field!r} holds a lone surrogate ({text[error.start]!r} at character "
                            f"{error.start}), which is not Unicode text",
                            "send UTF-8 text; a JSON \\uD800-\\uDFFF escape must be half of a surrogate pair")
    return text


def _strongest(values: np.ndarray, indices: np.ndarray, top: int) -> list[list]:
    """One token's active latents ``[[id, act], ...]``, strongest first, at most ``top``."""
    keep = np.flatnonzero(values > 0)
    keep = keep[np.argsort(-values[keep], kind="stable")][:top]
    return [[int(indices[k]), _rounded(values[k])] for k in keep]


def _whole_text_ranking(values: np.ndarray, indices: np.ndarray) -> list[list]:
    """Every latent active on the text, ``[id, summed activation, max activation, tokens active]``,
    largest sum first (ties: smaller id first)."""
    active = values > 0
    ids, where = np.unique(indices[active], return_inverse=True)
    totals = np.bincount(where, weights=values[active], minlength=ids.size)
    maxima = np.zeros(ids.size)
    np.maximum.at(maxima, where, values[active])
    counts = np.bincount(where, minlength=ids.size)
    order = np.lexsort((ids, -totals))
    return [[int(ids[j]), _rounded(totals[j]), _rounded(maxima[j]), int(counts[j])] for j in order]


class SiteEncoder:
    """The ``LiveEncoder`` of the checkpoint version the site in ``site_dir`` pins (its
    ``site.json``), loaded by ``load(version)`` (None: the site pins none, an older build) and
    loaded again when a rebuild of the site pins another. The pin is checked at most every
    ``check_every_s`` seconds: a ``stat`` of ``site.json`` (through the site's link, so a switch of
    builds is seen) and a read only when it changed. Nothing is loaded until the first ``current``."""

    def __init__(self, site_dir, load: Callable[[str | None], LiveEncoder], check_every_s: float = 1.0):
        self.pointer = Path(site_dir) / SITE_POINTER
        self.load = load
        self.check_every_s = check_every_s
        self._lock = threading.Lock()
        self._encoder: LiveEncoder | None = None
        self._loaded_for: object = ()   # the pin the encoder was loaded for (() before any load)
        self._stat: tuple | None = None
        self._pin: str | None = None
        self._checked = float("-inf")

    def site_checkpoint(self) -> str | None:
        """The checkpoint version the site pins now (None when it pins none)."""
        info = os.stat(self.pointer)
        key = (info.st_ino, info.st_mtime_ns, info.st_size)
        if key != self._stat:
            self._pin = pinned_checkpoint(json.loads(self.pointer.read_bytes()))
            self._stat = key
        return self._pin

    def current(self) -> LiveEncoder:
        """The encoder of the site's checkpoint, loading it first when the site changed. A load
        that fails raises (the site's pages and the old weights would disagree) and is tried again
        at the next request."""
        with self._lock:
            now = time.monotonic()
            if self._encoder is not None and now - self._checked < self.check_every_s:
                return self._encoder
            pin = self.site_checkpoint()
            if pin != self._loaded_for:
                self._encoder = None            # never answer with weights the site no longer shows
                self._encoder, self._loaded_for = self.load(pin), pin
            self._checked = now
            return self._encoder

    def limits(self) -> dict:
        return self.current().limits()


def checkpoint_loader(store, sae_name: str, load_model: Callable[[], object], device="cpu",
                      **bounds) -> Callable[[str | None], LiveEncoder]:
    """``load(version)`` for ``SiteEncoder``: the ``LiveEncoder`` of checkpoint ``version`` of SAE
    ``sae_name`` in ``store`` (None: the committed one) at the hook point that version was trained
    on; the base model comes from ``load_model()``, called once. ``bounds``: LiveEncoder's
    ``max_tokens``, ``top``, …. StorageError naming the version and the fix when it is gone."""
    from sae_platform.activations import sae_hook_entry
    from sae_platform.trainer import load_sae

    model: list = []

    def load(version: str | None) -> LiveEncoder:
        version = version or checkpoint_version(store, sae_name)   # the version first, then its weights
        try:
            sae, cfg = load_sae(store, sae_name, device, version=version)
        except StorageError as error:
            raise StorageError(f"the feature browser shows checkpoint {version} of SAE {sae_name!r}, which the live "
                               f"server cannot load: {error.problem}",
                               f"rebuild the browser for the current checkpoint (`sae-platform features --sae "
                               f"{sae_name}`); the live server follows it") from error
        entry = sae_hook_entry(store, sae_name, cfg)  # where this version's training rows were read
        model[:] = model or [load_model()]
        return LiveEncoder(model[0], sae, entry.hook_name, entry.hook_name_in, checkpoint_version=version, **bounds)

    return load


def make_live_server(site_dir, encoder: LiveEncoder | SiteEncoder, host: str = "127.0.0.1", port: int = 8000,
                     quiet: bool = False, extra_hosts=None, reports_dir=None):
    """The browser's static server for ``site_dir`` plus ``POST /api/features``, ``POST /api/steer``
    and ``GET /api/limits``, bound but not started (a port in use is a PlatformError now; nothing of
    ``encoder`` is loaded yet); it answers to the host names ``browser.server.make_server`` allows
    (``extra_hosts``: names besides its address and loopback); ``reports_dir`` is served under
    ``reports/`` as ``browse`` serves it (the sweep comparison the overview links to)."""
    def answer(handler, status: int, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json; charset=utf-8")
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Cache-Control", "no-store")
        handler.end_headers()
        handler.wfile.write(data)

    def do_GET(handler):  # http.server's name
        if handler.path.split("?")[0] != LIMITS_PATH:
            return http.server.SimpleHTTPRequestHandler.do_GET(handler)   # the site's files
        try:
            return answer(handler, 200, encoder.current().limits())
        except PlatformError as error:
            return answer(handler, 503, {"error": str(error)})

    def do_POST(handler):  # http.server's name
        path = handler.path.split("?")[0]
        if path not in (API_PATH, STEER_PATH):
            return answer(handler, 404, {"error": f"only POST {API_PATH} and {STEER_PATH} are answered"})
        try:
            length = int(handler.headers.get("Content-Length") or 0)
        except ValueError:
            return answer(handler, 400, {"error": "bad Content-Length"})
        if length <= 0 or length > MAX_BODY:
            return answer(handler, 413 if length > MAX_BODY else 400,
                          {"error": f"the body must be 1..{MAX_BODY} bytes of JSON, got {length}"})
        try:
            request = json.loads(handler.rfile.read(length).decode("utf-8"))
            if not isinstance(request, dict):
                raise ValueError("not an object")
            live = encoder.current()
        except RecursionError:
            return answer(handler, 400, {"error": 'the JSON is nested too deeply; send {"text": "..."}'})
        except (ValueError, UnicodeDecodeError):
            return answer(handler, 400, {"error": 'send a JSON object {"text": "..."}'})
        except PlatformError as error:   # the site's checkpoint could not be loaded
            return answer(handler, 503, {"error": str(error)})
        try:
            if path == STEER_PATH:
                return stream(handler, live.steering(request))
            return answer(handler, 200, live.features(request.get("text"), request.get("feature")))
        except Busy as error:
            return answer(handler, 429, {"error": str(error)})
        except PlatformError as error:
            return answer(handler, 400, {"error": str(error)})
        except Exception as error:  # a bug, not the request: say so, and keep serving the next request
            handler.log_error("live endpoint failed: %r", error)
            return answer(handler, 500, {"error": f"the server failed on this text ({type(error).__name__}); "
                                                  "the next request is answered as usual"})

    def stream(handler, lines: "_Held") -> None:
        """200 and one JSON line per item of ``lines`` as it comes (HTTP/1.0: the connection's end
        ends the body); a failure after the first line is sent as an ``{"error"}`` line."""
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/x-ndjson; charset=utf-8")
            handler.send_header("Cache-Control", "no-store")
            handler.end_headers()
            for line in lines:
                handler.wfile.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass                               # the page went away: stop generating
        except Exception as error:
            handler.log_error("steering failed: %r", error)
            handler.wfile.write(json.dumps({"error": f"the model failed midway ({type(error).__name__})"}).encode()
                                + b"\n")
        finally:
            lines.close()
            handler.close_connection = True

    return make_server(site_dir, host, port, quiet=quiet, handler_methods={"do_GET": do_GET, "do_POST": do_POST},
                       reports_dir=reports_dir, extra_hosts=extra_hosts)


LIVE_BANNER = "Feature browser with live text: http://{host}:{port}/#/live  (Ctrl-C stops)"


def serve_live(site_dir, encoder: LiveEncoder | SiteEncoder, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the site and the live endpoint until interrupted."""
    serve_until_interrupted(make_live_server(site_dir, encoder, host, port), LIVE_BANNER)


def serve_live_in_thread(site_dir, encoder: LiveEncoder | SiteEncoder, host: str = "127.0.0.1", port: int = 0):
    """Start a quiet live server on a thread; returns (server, url). Stop with ``server.shutdown()``."""
    return serve_in_thread(site_dir, server=make_live_server(site_dir, encoder, host, port, quiet=True))
