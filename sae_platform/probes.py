"""Recovery of hypothesized features: the best single-latent 1-D logistic probe per property.

Gao et al. 2024 ("Scaling and evaluating sparse autoencoders", section 4.2, "Recovering known
features with 1D probes"): for each binary property of tokens, fit a logistic regression on
every single latent (one weight and one bias) and report the lowest cross-entropy among them.
An SAE that has a latent for the property gets a loss near 0; one that has none stays near the
entropy of the property's base rate. The same probes on raw neurons (here: the d_model channels
of the value the SAE reads, at its own input hook point: the residual stream, an attention or
MLP output, or a transcoder's MLP input) are the baseline.

Properties are computed from the text itself (``token_properties``), token by token:
inside double quotes, capitalised word, all-caps word, number, start of a line, speaker name of
a play (a short line of its own after a blank line ending in ".", "HAMLET." / "Hor."), end of a
sentence, comma, word start (token begins with a space), inside parentheses.

The fit (``best_probe_losses``) is vectorised over all columns at once and works on sparse codes:
a latent that is 0 on a token contributes only through the bias, so each Newton step needs per
column the sums over its non-zero entries plus the counts of the zero ones. A small L2 penalty on
the weight keeps separable properties finite; the reported loss is the plain mean cross-entropy
(nats per token).

``fit_logistic`` is the dense multi-column probe of k-sparse probing (``sparse_probing``): an L2
logistic regression with sklearn's objective, as SAEBench fits it.
"""

import re

import numpy as np
import torch

from sae_platform.errors import PlatformError

L2 = 1e-3
NEWTON_STEPS = 30

PROPERTIES = ("inside_quotes", "capitalized_word", "all_caps_word", "number", "start_of_line", "speaker_name",
              "end_of_sentence", "comma", "word_start", "inside_parentheses")


def token_properties(pieces: list[str]) -> dict[str, np.ndarray]:
    """Binary properties [n] of the tokens of one text, given the exact text of each token
    (``"".join(pieces)`` is the text). A token has a character-level property when its first
    non-space character has it."""
    text = "".join(pieces)
    n_chars = len(text)
    starts = np.cumsum([0, *(len(p) for p in pieces)])[:-1]
    quotes = np.zeros(n_chars + 1, dtype=bool)
    parens = np.zeros(n_chars + 1, dtype=bool)
    inside, depth = False, 0
    for i, ch in enumerate(text):
        if ch in "\u201c\u201d\"":
            inside = ch == "\u201c" or (ch == '"' and not inside)
        if ch == "(":
            depth += 1
        quotes[i] = inside and ch not in "\u201c\u201d\""
        parens[i] = depth > 0 and ch not in "()"
        if ch == ")":
            depth = max(0, depth - 1)
    speaker = np.zeros(n_chars + 1, dtype=bool)
    for m in re.finditer(r"(?:^|\n)\s*\n([A-Z][A-Za-z' ]{0,30}\.)[ \t]*\n", text):
        speaker[m.start(1):m.end(1) - 1] = True
    out = {k: np.zeros(len(pieces), dtype=bool) for k in PROPERTIES}
    for t, (piece, s) in enumerate(zip(pieces, starts, strict=True)):
        stripped = piece.lstrip()
        first = s + (len(piece) - len(stripped))  # the first non-space character
        word = re.match(r"[A-Za-z]+", stripped)
        out["inside_quotes"][t] = bool(stripped) and quotes[first]
        out["inside_parentheses"][t] = bool(stripped) and parens[first]
        out["speaker_name"][t] = bool(stripped) and speaker[first]
        out["number"][t] = any(c.isdigit() for c in piece)
        out["comma"][t] = stripped == ","
        out["end_of_sentence"][t] = stripped in (".", "!", "?") or bool(re.fullmatch(r"[.!?]+[\"'\u201d)]*", stripped))
        out["word_start"][t] = piece.startswith(" ") and bool(word)
        out["capitalized_word"][t] = bool(word) and word.group()[0].isupper() and (
            len(word.group()) == 1 or not word.group().isupper())
        out["all_caps_word"][t] = bool(word) and len(word.group()) >= 2 and word.group().isupper()
        prev = text[:s].rstrip(" \t")
        out["start_of_line"][t] = bool(stripped) and not stripped.startswith("\n") and (
            s == 0 or prev.endswith("\n") or piece.lstrip(" \t").startswith("\n"))
    return out


def best_probe_losses(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int, n_cols: int,
                      labels: np.ndarray, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Per property: the lowest 1-D logistic probe loss over the columns, and that column.

    ``rows, cols, vals``: the non-zero entries of a [n_rows, n_cols] matrix (latent codes or
    neurons; zero entries may be omitted); ``labels``: bool [n_properties, n_rows]. Returns
    (loss [n_properties] in nats per token, best column [n_properties]). A column that is zero
    on every token still fits the bias: its loss is the entropy of the base rate."""
    labels = np.asarray(labels, dtype=bool)
    if labels.ndim != 2 or labels.shape[1] != n_rows:
        raise PlatformError(f"labels must be [n_properties, n_rows={n_rows}], got {labels.shape}",
                            "compute one label per token of the probed rows")
    dev = torch.device(device)
    r = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=dev)
    c = torch.as_tensor(np.asarray(cols), dtype=torch.long, device=dev)
    v = torch.as_tensor(np.asarray(vals), dtype=torch.float64, device=dev)
    # scale each column to unit RMS (conditioning only: a 1-D probe is scale-invariant)
    ss = torch.zeros(n_cols, dtype=torch.float64, device=dev).index_add_(0, c, v * v)
    scale = (ss / n_rows).sqrt().clamp_min(1e-12)
    v = v / scale[c]
    nnz = torch.bincount(c, minlength=n_cols).double()
    n_zero = n_rows - nnz
    losses, best = [], []
    for y_np in labels:
        y = torch.as_tensor(y_np, dtype=torch.float64, device=dev)
        pos_total = y.sum()
        yv = y[r]
        pos_nz = torch.zeros(n_cols, dtype=torch.float64, device=dev).index_add_(0, c, yv)
        pos_zero = pos_total - pos_nz
        w = torch.zeros(n_cols, dtype=torch.float64, device=dev)
        p0 = (pos_total / n_rows).clamp(1e-9, 1 - 1e-9)
        b = torch.full((n_cols,), float(torch.log(p0 / (1 - p0))), dtype=torch.float64, device=dev)
        for _ in range(NEWTON_STEPS):
            z = w[c] * v + b[c]
            p = torch.sigmoid(z)
            pb = torch.sigmoid(b)
            g_w = torch.zeros_like(w).index_add_(0, c, (p - yv) * v) + L2 * w
            g_b = torch.zeros_like(b).index_add_(0, c, p - yv) + n_zero * pb - pos_zero
            h = p * (1 - p)
            h_ww = torch.zeros_like(w).index_add_(0, c, h * v * v) + L2
            h_wb = torch.zeros_like(w).index_add_(0, c, h * v)
            h_bb = torch.zeros_like(b).index_add_(0, c, h) + n_zero * pb * (1 - pb) + 1e-9
            det = (h_ww * h_bb - h_wb * h_wb).clamp_min(1e-12)
            dw = (h_bb * g_w - h_wb * g_b) / det
            db = (h_ww * g_b - h_wb * g_w) / det
            w = w - dw.clamp(-5, 5)
            b = b - db.clamp(-5, 5)
        z = w[c] * v + b[c]
        # cross-entropy: non-zero entries exactly, zero entries through the bias alone
        ce_nz = torch.zeros_like(w).index_add_(0, c, torch.nn.functional.softplus(z) - yv * z)
        ce_zero = n_zero * torch.nn.functional.softplus(b) - pos_zero * b
        loss = (ce_nz + ce_zero) / n_rows
        j = int(torch.argmin(loss))
        losses.append(float(loss[j]))
        best.append(j)
    return np.array(losses), np.array(best)


DENSE_BINS = 256


@torch.no_grad()
def best_probe_losses_dense(x: np.ndarray | torch.Tensor, labels: np.ndarray, bins: int = DENSE_BINS,
                            device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """``best_probe_losses`` for a dense matrix ``x`` [n_rows, n_cols] (neurons), fitted on each
    column's ``bins`` quantile bins (every value replaced by the mean of its bin, each bin weighted
    by its count): the per-token fit costs n_rows x n_cols per Newton step, this one n_cols x bins,
    and the loss differs by far less than the differences it is used to compare (< 1e-3 nats in
    the tests)."""
    labels = np.asarray(labels, dtype=bool)
    x = torch.as_tensor(x, device=device).float()
    n_rows, n_cols = x.shape
    if labels.ndim != 2 or labels.shape[1] != n_rows:
        raise PlatformError(f"labels must be [n_properties, n_rows={n_rows}], got {labels.shape}",
                            "compute one label per token of the probed rows")
    xt = x.T.contiguous()                                                    # [C, N]
    srt = xt.sort(dim=1).values
    cuts = srt[:, (torch.arange(1, bins, device=x.device) * n_rows) // bins].contiguous()  # [C, B-1]
    flat = (torch.searchsorted(cuts, xt, right=True) + torch.arange(n_cols, device=x.device)[:, None] * bins)
    flat = flat.reshape(-1)
    count = torch.bincount(flat, minlength=n_cols * bins).double().reshape(n_cols, bins)
    total = torch.bincount(flat, weights=xt.reshape(-1).double(), minlength=n_cols * bins).reshape(n_cols, bins)
    v = total / count.clamp_min(1)
    v = v / (((v * v) * count).sum(1, keepdim=True) / n_rows).sqrt().clamp_min(1e-12)
    losses, best = [], []
    for y_np in labels:
        y = torch.as_tensor(y_np, dtype=torch.float64, device=x.device)
        pos = torch.bincount(flat, weights=y.repeat(n_cols), minlength=n_cols * bins).reshape(n_cols, bins)
        p0 = float(y.mean().clamp(1e-9, 1 - 1e-9))
        w = torch.zeros(n_cols, 1, dtype=torch.float64, device=x.device)
        b = torch.full((n_cols, 1), float(np.log(p0 / (1 - p0))), dtype=torch.float64, device=x.device)
        for _ in range(NEWTON_STEPS):
            p = torch.sigmoid(w * v + b)
            r = count * p - pos
            h = count * p * (1 - p)
            g_w, g_b = (r * v).sum(1, keepdim=True) + L2 * w, r.sum(1, keepdim=True)
            h_ww = (h * v * v).sum(1, keepdim=True) + L2
            h_wb, h_bb = (h * v).sum(1, keepdim=True), h.sum(1, keepdim=True) + 1e-9
            det = (h_ww * h_bb - h_wb * h_wb).clamp_min(1e-12)
            w = w - ((h_bb * g_w - h_wb * g_b) / det).clamp(-5, 5)
            b = b - ((h_ww * g_b - h_wb * g_w) / det).clamp(-5, 5)
        z = w * v + b
        loss = (count * torch.nn.functional.softplus(z) - pos * z).sum(1) / n_rows
        j = int(torch.argmin(loss))
        losses.append(float(loss[j]))
        best.append(j)
    return np.array(losses), np.array(best)


def base_rate_entropy(labels: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each property's base rate: the loss of a probe that knows nothing."""
    p = np.clip(np.asarray(labels, dtype=float).mean(axis=1), 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


# -- dense logistic regression (k-sparse probing, ``sparse_probing``) -----------------------------

LOGISTIC_C = 1.0        # inverse L2 strength, as sklearn's LogisticRegression default (what SAEBench fits)
LOGISTIC_MAX_ITER = 1000  # SAEBench's max_iter for its sklearn probes


def fit_logistic(x: np.ndarray | torch.Tensor, y: np.ndarray, c: float = LOGISTIC_C,
                 max_iter: int = LOGISTIC_MAX_ITER) -> tuple[torch.Tensor, float]:
    """An L2-regularised logistic regression on ``x`` [n, d] with labels ``y`` bool [n]: (weights
    [d] float64, bias). The objective is sklearn's ``LogisticRegression(penalty="l2", C=c)``
    (½‖w‖² + c · Σ log-loss, the bias unpenalised), which SAEBench's k-sparse probes fit
    (``sae_bench/evals/sparse_probing/probe_training.py``, ``train_sklearn_probe``); minimised
    with L-BFGS in float64 (strong Wolfe line search) from zero. Raises PlatformError unless ``y``
    has both classes and one label per row."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    target = torch.as_tensor(np.asarray(y, dtype=bool), dtype=torch.float64)
    if x.ndim != 2 or target.shape != (x.shape[0],) or not 0 < float(target.sum()) < len(target):
        raise PlatformError(f"a probe needs rows [n, d] and n labels of both classes, got x {tuple(x.shape)} and "
                            f"{int(target.sum())} positive of {len(target)} labels",
                            "give each task contexts of both classes")
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], lr=1, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        w, b = params[:-1], params[-1]
        loss = c * torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, target, reduction="sum")
        loss = loss + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    params = params.detach()
    return params[:-1], float(params[-1])


def logistic_accuracy(x: np.ndarray | torch.Tensor, y: np.ndarray, weights: torch.Tensor, bias: float) -> float:
    """Share of rows of ``x`` [n, d] whose predicted class (logit > 0) is ``y`` bool [n]."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    predicted = (x @ weights + bias > 0).numpy()
    return float((predicted == np.asarray(y, dtype=bool)).mean())
