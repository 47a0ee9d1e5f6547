"""Schemathesis hooks for scripts/schemathesis.sh.

- `no_full_key`: fails when an answer's body or headers hold a full key: one of the server's
  (GEMINI_API_KEYS) or one added through `POST /api/keys/add` during the run.
- `map_case`: the fuzzer cannot guess a 39-character key, so half of its valid `{apiKey}` values
  are swapped for references that exist: full keys, masked forms, and a masked form two keys share.
"""

import os
import zlib

import schemathesis
from schemathesis import GenerationMode

SERVER_KEYS = [k for k in os.environ["GEMINI_API_KEYS"].split(",") if k]
# Keys of 16 characters or fewer are masked to a quarter of their length, and such short strings
# turn up in answers by chance (a count, a word), so only longer ones are looked for.
MIN_KEY_LENGTH = 17
added_keys = set()


def masked(key):
    return f"{key[:8]}...{key[-4:]}" if len(key) > 16 else f"{key[:len(key) // 4]}..."


# A key whose masked form another key shares is named only by that form (a 409), never in full, so
# no call of the run can take every key out of service and make `best` a 500.
MASKS = [masked(k) for k in SERVER_KEYS]
REFERENCES = [k for k, m in zip(SERVER_KEYS, MASKS) if MASKS.count(m) == 1] + sorted(set(MASKS))
# Text fixed at build time, which holds example keys but can hold no key of this run.
STATIC_PATHS = {"/api/keys/dashboard", "/api/keys/openapi.json"}


@schemathesis.check
def no_full_key(ctx, response, case):
    """No answer quotes a full key, in its body or in any header."""
    texts = [response.content.decode("utf-8", "replace")]
    texts += [f"{name}: {value}" for name, values in response.headers.items() for value in values]
    static = case.operation.path in STATIC_PATHS
    for key in [*SERVER_KEYS, *([] if static else added_keys)]:
        if any(key in text for text in texts):
            raise AssertionError(f"The answer holds the full key {masked(key)}")
    if case.operation.path == "/api/keys/add" and response.status_code == 201:
        key = case.body.get("apiKey") if isinstance(case.body, dict) else None
        if isinstance(key, str) and len(key) >= MIN_KEY_LENGTH:
            added_keys.add(key)


@schemathesis.hook
def map_case(ctx, case):
    """Half of the valid `{apiKey}` values become a reference to a key that exists."""
    value = (case.path_parameters or {}).get("apiKey")
    positive = case.meta is None or case.meta.generation.mode == GenerationMode.POSITIVE
    if isinstance(value, str) and positive:
        pick = zlib.crc32(value.encode("utf-8", "surrogatepass"))
        if pick % 2:
            case.path_parameters["apiKey"] = REFERENCES[pick // 2 % len(REFERENCES)]
    return case
