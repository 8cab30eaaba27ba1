"""Token ids to the text the browser shows: the exact strings of a window's tokens (pass 3's
``token_strs``, ``window_strings``) and a readable string for one token out of context (logit
tables, token properties, the live endpoint: ``token_display_strings``).

Window strings. ``token_strs`` are the exact text of each token, so ``"".join(token_strs)`` is the
window's decoded text (``tokenizer.decode(ids, clean_up_tokenization_spaces=False)``). Spaces,
newlines, tabs and markup (``<script>``) are kept verbatim: making whitespace visible and
escaping HTML is the renderer's job. A token that is only part of a UTF-8 character (byte-level
BPE splits emoji and accents into byte tokens) decodes alone to U+FFFD; in windows containing
such tokens the strings come from incremental decoding instead: the token that completes a
character carries the whole character and the tokens before it carry ``""``. Strings come from
``tokenizer.decode`` of single tokens, which is faithful for byte-level BPE (GPT-2, Llama-3,
SmolLM2); SentencePiece decoders may drop the leading space of a word-initial piece.

Display strings. Out of context a byte token has no character to complete, so it is shown as its
bytes in backslash escapes (``"\\xf0\\x9f"``) when the tokenizer is byte-level, else as its
vocabulary entry.
"""

import codecs

import numpy as np

REPLACEMENT = "\ufffd"


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _single_strings(tokenizer, ids: np.ndarray) -> list[str]:
    return tokenizer.batch_decode([[int(i)] for i in ids], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)


def window_strings(tokenizer, flat_tok: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Exact text per window token (see the module docstring), as an object array."""
    uniq, inv = np.unique(flat_tok, return_inverse=True)
    table = np.array(_single_strings(tokenizer, uniq), dtype=object)
    strs = table[inv]
    partial = np.array([REPLACEMENT in s for s in table], dtype=bool)[inv]
    if partial.any():
        windows = np.unique(np.searchsorted(starts, np.flatnonzero(partial), side="right") - 1)
        dirty = np.concatenate([np.arange(starts[w], starts[w + 1]) for w in windows])
        byte_of = _token_bytes(tokenizer, np.unique(flat_tok[dirty]), dict(zip(uniq.tolist(), table, strict=True)))
        for w in windows:
            a, z = int(starts[w]), int(starts[w + 1])
            ids = flat_tok[a:z].tolist()
            pieces = [byte_of.get(i) for i in ids]
            if all(p is not None for p in pieces):
                strs[a:z] = _utf8_strings(pieces)
            else:
                strs[a:z] = _incremental_strings(tokenizer, flat_tok[a:z])
    return strs


def _token_bytes(tokenizer, ids: np.ndarray, single: dict[int, str]) -> dict[int, bytes]:
    """The bytes of byte-level BPE tokens (GPT-2 alphabet), kept only where they decode to what
    the tokenizer itself decodes the token to."""
    out = {}
    for i, raw in zip(ids.tolist(), tokenizer.convert_ids_to_tokens(ids.tolist()), strict=True):
        data = _byte_level_bytes(raw)
        if data is not None and data.decode("utf-8", errors="replace") == single[i]:
            out[i] = data
    return out


def _utf8_strings(pieces: list[bytes]) -> list[str]:
    """Incremental UTF-8 decoding: a token ending inside a character yields "" and the token
    completing it yields the character (fast path of _incremental_strings for byte-level BPE)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    last = len(pieces) - 1
    return [decoder.decode(p, final=(i == last)) for i, p in enumerate(pieces)]


def _incremental_strings(tokenizer, ids: np.ndarray) -> list[str]:
    """Streaming detokenization: a token whose text is still an incomplete character yields ""
    and the token completing it yields the whole character; the last token takes any rest."""
    out, pending = [], 0
    for i in range(len(ids)):
        text = _decode(tokenizer, ids[pending:i + 1])
        if text.endswith(REPLACEMENT) and i + 1 < len(ids):
            out.append("")
        else:
            out.append(text)
            pending = i + 1
    return out


def token_display_strings(tokenizer, ids) -> list[str]:
    """A readable string for each single token id, out of context (for logit tables): its text,
    or, for a token that is part of a UTF-8 character, its bytes as backslash escapes
    (``"\\xf0\\x9f"``) when the tokenizer is byte-level, else the vocabulary entry."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    strs = _single_strings(tokenizer, ids)
    for i, s in enumerate(strs):
        if REPLACEMENT in s:
            raw = tokenizer.convert_ids_to_tokens(int(ids[i]))
            data = _byte_level_bytes(raw)
            if data is not None and data.decode("utf-8", errors="replace") == s:
                strs[i] = data.decode("utf-8", errors="backslashreplace")
            elif raw is not None and REPLACEMENT not in raw:
                strs[i] = raw
    return strs


def _byte_level_unicode() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, inverted."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_UNICODE_TO_BYTE = _byte_level_unicode()


def _byte_level_bytes(token: str | None) -> bytes | None:
    if not token or any(ch not in _UNICODE_TO_BYTE for ch in token):
        return None
    return bytes(_UNICODE_TO_BYTE[ch] for ch in token)
