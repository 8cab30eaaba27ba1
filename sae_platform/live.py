"""Text in, features out: the feature browser with a live endpoint (``sae-platform serve``).

The server serves a built browser site (as ``sae_platform.browser.server.serve`` does, same security
headers) and answers ``POST /api/features`` with a JSON body ``{"text": "..."}``: the text is
tokenized (with the model's start token in front, as the training contexts have), run through the
base model up to the SAE's own hook point (``LiveEncoder.hook_point``; a transcoder's input
``input_hook_point``; ``sae-platform serve`` takes both from ``activations.sae_hook_entry``, where
the SAE's training rows were read) and encoded by the SAE; the answer lists per token its display
string and its active latents, strongest first::

    {"tokens": [" The", ...], "features": [[[id, act], ...], ...], "truncated": false, "max_tokens": 256}

Bounds: the request body is at most ``MAX_BODY`` bytes, the text at most ``max_chars`` characters
and ``max_tokens`` tokens (longer input is cut and ``truncated`` says so), at most ``top`` latents
per token. Requests never name files: the endpoint reads only its JSON body, and GET requests go
to the static site's directory handler (no listing outside it). One request runs the model at a
time (a lock). The server binds 127.0.0.1 unless told otherwise and checks every request's ``Host``
header (``browser.server``). A body that is not JSON, nested too deeply, or whose text holds a lone
surrogate gets 400 with the reason; the server keeps answering.
"""

import json
import threading
from dataclasses import dataclass

import numpy as np
import torch

from sae_platform.browser.server import make_server, serve_in_thread, serve_until_interrupted
from sae_platform.errors import PlatformError
from sae_platform.hooks import sae_hook_points
from sae_platform.tokens import token_display_strings

MAX_BODY = 64 * 1024
API_PATH = "/api/features"


@dataclass
class LiveEncoder:
    """The base model (``HookedModel``) and the SAE, ready to answer texts. The SAE encodes the
    value at ``hook_point`` (a transcoder: at ``input_hook_point``, its input); a name the model
    lacks or a wrong pairing is a ModelError (``hooks.sae_hook_points``)."""

    hooked: object
    sae: object
    hook_point: str
    input_hook_point: str | None = None
    max_tokens: int = 256
    max_chars: int = 4000
    top: int = 16

    def __post_init__(self):
        self._lock = threading.Lock()
        self.reads = sae_hook_points(self.hooked.model, self.hook_point, self.input_hook_point,
                                     self.sae.is_transcoder)[1].name

    @torch.inference_mode()
    def features(self, text: str) -> dict:
        """The active latents of each token of ``text`` (see the module docstring for the answer)."""
        if not isinstance(text, str):
            raise PlatformError("the request's 'text' must be a string", 'send {"text": "your text"}')
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise PlatformError(f"the request's 'text' holds a lone surrogate ({text[error.start]!r} at character "
                                f"{error.start}), which is not Unicode text",
                                "send UTF-8 text; a JSON \\uD800-\\uDFFF escape must be half of a surrogate pair")
        truncated = len(text) > self.max_chars
        text = text[: self.max_chars]
        ids = self.hooked.tokenizer(text, add_special_tokens=False)["input_ids"]
        truncated = truncated or len(ids) > self.max_tokens
        ids = [int(i) for i in ids[: self.max_tokens]]
        if not ids:
            return {"tokens": [], "features": [], "truncated": truncated, "max_tokens": self.max_tokens}
        with self._lock:
            x = self.hooked.read(torch.tensor([[self.hooked.start_token_id, *ids]]), (self.reads,))[self.reads][0, 1:]
            sae_device = self.sae.W_dec.device
            with torch.autocast(sae_device.type, enabled=False):
                codes = self.sae.encode(x.to(sae_device))
        values, indices = codes.values.float().cpu().numpy(), codes.indices.cpu().numpy()
        per_token = []
        for v, i in zip(values, indices, strict=True):
            keep = np.flatnonzero(v > 0)
            keep = keep[np.argsort(-v[keep], kind="stable")][: self.top]
            per_token.append([[int(i[k]), float(f"{v[k]:.4g}")] for k in keep])  # 4 significant digits
        return {"tokens": token_display_strings(self.hooked.tokenizer, ids), "features": per_token,
                "truncated": truncated, "max_tokens": self.max_tokens}


def make_live_server(site_dir, encoder: LiveEncoder, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False,
                     extra_hosts=None):
    """The browser's static server for ``site_dir`` plus ``POST /api/features`` (not started); it
    answers to the host names ``browser.server.make_server`` allows (``extra_hosts``: names
    besides its address and loopback)."""
    def answer(handler, status: int, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json; charset=utf-8")
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Cache-Control", "no-store")
        handler.end_headers()
        handler.wfile.write(data)

    def do_POST(handler):  # http.server's name
        if handler.path.split("?")[0] != API_PATH:
            return answer(handler, 404, {"error": f"only POST {API_PATH} is answered"})
        try:
            length = int(handler.headers.get("Content-Length") or 0)
        except ValueError:
            return answer(handler, 400, {"error": "bad Content-Length"})
        if length <= 0 or length > MAX_BODY:
            return answer(handler, 413 if length > MAX_BODY else 400,
                          {"error": f"the body must be 1..{MAX_BODY} bytes of JSON, got {length}"})
        try:
            request = json.loads(handler.rfile.read(length).decode("utf-8"))
            text = request["text"] if isinstance(request, dict) else None
            return answer(handler, 200, encoder.features(text))
        except RecursionError:
            return answer(handler, 400, {"error": 'the JSON is nested too deeply; send {"text": "..."}'})
        except (ValueError, KeyError, UnicodeDecodeError):
            return answer(handler, 400, {"error": 'send a JSON object {"text": "..."}'})
        except PlatformError as error:
            return answer(handler, 400, {"error": str(error)})
        except Exception as error:  # a bug, not the request: say so, and keep serving the next request
            handler.log_error("live endpoint failed: %r", error)
            return answer(handler, 500, {"error": f"the server failed on this text ({type(error).__name__}); "
                                                  "the next request is answered as usual"})

    return make_server(site_dir, host, port, quiet=quiet, handler_methods={"do_POST": do_POST}, extra_hosts=extra_hosts)


def serve_live(site_dir, encoder: LiveEncoder, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the site and the live endpoint until interrupted."""
    serve_until_interrupted(make_live_server(site_dir, encoder, host, port),
                            "Feature browser with live text: http://{host}:{port}/#/live  (Ctrl-C stops)")


def serve_live_in_thread(site_dir, encoder: LiveEncoder, host: str = "127.0.0.1", port: int = 0):
    """Start a quiet live server on a thread; returns (server, url). Stop with ``server.shutdown()``."""
    return serve_in_thread(site_dir, server=make_live_server(site_dir, encoder, host, port, quiet=True))
