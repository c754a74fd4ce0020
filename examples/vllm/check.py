"""Check a running prefill/decode deployment end to end; exits 1 when an answer is wrong.

For each prompt it asks, greedily (``temperature=0``): the proxy, not streamed and streamed,
for completions and chat completions, and a reference instance directly (any vLLM instance of
the same model, for example a prefill instance: a request without ``kv_transfer_params`` is an
ordinary request there). The streamed text must equal the unstreamed one, every stream must
end with ``[DONE]``, and the proxy's text must equal the reference's (``--compare-chars N``:
only the first N characters, for deployments whose two sides compute with different TP sizes,
where greedy decoding may part after a while). Python stdlib only.

Run: ``python check.py --proxy http://127.0.0.1:8000 --reference http://127.0.0.1:8100 --model M``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

PROMPTS = (
    "The capital of France is",
    "Write the numbers from one to twenty in words, separated by commas:",
    # long enough to span many KV blocks at any block size
    "Summarize the following text in one sentence. " + "The river flows past the old mill and the bridge. " * 120,
)


class CheckFailed(Exception):
    """An answer was missing, malformed, or different from what it must equal."""


def _post(base: str, path: str, body: dict[str, Any], timeout: float) -> tuple[int, bytes]:
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _text(path: str, choice: dict[str, Any], streamed: bool) -> str:
    if path == "/v1/completions":
        return choice.get("text") or ""
    part = choice.get("delta" if streamed else "message") or {}
    return part.get("content") or ""


def ask(base: str, path: str, body: dict[str, Any], *, stream: bool, timeout: float) -> str:
    """The generated text of one request to ``base``.

    Raises:
        CheckFailed: a status other than 200, or a malformed answer or stream.
    """
    status, raw = _post(base, path, dict(body, stream=stream), timeout)
    if status != 200:
        raise CheckFailed(f"{base}{path} answered {status}: {raw[:300]!r}")
    try:
        if not stream:
            return _text(path, json.loads(raw)["choices"][0], streamed=False)
        events = [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e.strip()]
        if not events or events[-1] != "[DONE]":
            raise CheckFailed(f"{base}{path}: the stream does not end with [DONE]: {events[-1:]!r}")
        chunks = [json.loads(e) for e in events[:-1]]
        return "".join(_text(path, c["choices"][0], streamed=True) for c in chunks if c.get("choices"))
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise CheckFailed(f"{base}{path}: malformed answer ({exc!r}): {raw[:300]!r}") from None


def check(proxy: str, reference: str, model: str, *, max_tokens: int = 24, compare_chars: int = 0,
          prompts: Sequence[str] = PROMPTS, timeout: float = 300.0) -> list[str]:
    """Run every check; the failures, each in one line (empty: all passed)."""
    failures = []
    for i, prompt in enumerate(prompts):
        for path, body in (
            ("/v1/completions", {"model": model, "prompt": prompt}),
            ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": prompt}]}),
        ):
            body = dict(body, max_tokens=max_tokens, temperature=0)
            try:
                plain = ask(proxy, path, body, stream=False, timeout=timeout)
                streamed = ask(proxy, path, body, stream=True, timeout=timeout)
                ref = ask(reference, path, body, stream=False, timeout=timeout)
            except (CheckFailed, OSError) as exc:
                failures.append(f"prompt {i} {path}: {exc}")
                continue
            n = compare_chars or None
            if not plain:
                failures.append(f"prompt {i} {path}: empty answer through the proxy")
            elif streamed != plain:
                failures.append(f"prompt {i} {path}: streamed {streamed!r} != not streamed {plain!r}")
            elif plain[:n] != ref[:n]:
                failures.append(f"prompt {i} {path}: proxy {plain[:n]!r} != reference {ref[:n]!r}")
            else:
                print(f"ok  prompt {i} {path}: {plain[:60]!r}", flush=True)
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--proxy", required=True, metavar="URL", help="the proxy, e.g. http://127.0.0.1:8000")
    p.add_argument("--reference", required=True, metavar="URL", help="an instance of the same model, asked directly")
    p.add_argument("--model", required=True)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--compare-chars", type=int, default=0, help="compare only the first N characters (0: all)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    args = p.parse_args(argv)
    failures = check(args.proxy, args.reference, args.model, max_tokens=args.max_tokens,
                     compare_chars=args.compare_chars, timeout=args.timeout)
    for f in failures:
        print(f"FAIL {f}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
