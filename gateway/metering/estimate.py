"""Request-side estimates used to reserve quota before a request is forwarded.

The reservation is settled against the provider's reported usage afterwards, so these
only need to be cheap and on the high side: over-reserving briefly holds back quota,
under-reserving lets a user overspend with concurrent requests.
"""

from __future__ import annotations

from typing import Any


def estimate_input_tokens(body: bytes) -> int:
    """Upper bound on the input tokens of a request body, without a tokenizer.

    Tokenizers average ~4 bytes per token on English and rarely go below ~2 bytes per
    token even for CJK or code once JSON framing (keys, quotes, escapes) is counted, so
    `len // 2` over-estimates nearly every real body; the +16 covers tiny bodies and the
    few tokens of per-message overhead the provider adds. Base64 media inflates the
    estimate a lot, which errs on the safe side.
    """
    return len(body) // 2 + 16


def _positive_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        if isinstance(value, float) and value.is_integer() and 0 <= value < 2**53:
            return int(value)  # `64000.0`: the same cap to the provider (only off the int path)
        return None
    return value


def _generation_config(body_obj: dict[str, Any]) -> dict[str, Any]:
    cfg = body_obj.get("generationConfig")
    if not isinstance(cfg, dict):
        cfg = body_obj.get("generation_config")
    return cfg if isinstance(cfg, dict) else {}


def requested_max_output(body_obj: dict[str, Any], provider: str) -> int | None:
    """The client's output cap: anthropic `max_tokens`, gemini `maxOutputTokens`.

    None when absent or not a non-negative int (the caller then uses its own default).
    Unknown providers also give None.
    """
    if provider == "anthropic":
        return _positive_int(body_obj.get("max_tokens"))
    if provider == "gemini":
        cfg = _generation_config(body_obj)
        value = cfg.get("maxOutputTokens")
        if value is None:
            value = cfg.get("max_output_tokens")
        return _positive_int(value)
    return None


def requested_candidates(body_obj: dict[str, Any]) -> int:
    """Gemini `candidateCount` (each candidate may use the whole output cap); 1 when absent or invalid."""
    cfg = _generation_config(body_obj)
    value = cfg.get("candidateCount")
    if value is None:
        value = cfg.get("candidate_count")
    n = _positive_int(value)
    return n if n else 1


def wants_images(body_obj: dict[str, Any], path_model: str) -> bool:
    """Whether a Gemini request may produce billable images (so image quota is reserved).

    True when `responseModalities` asks for IMAGE or the model is an image model
    (`gemini-*-image*`, `imagen-*`); `path_model` may carry a `models/` prefix.
    """
    cfg = _generation_config(body_obj)
    modalities = cfg.get("responseModalities")
    if modalities is None:
        modalities = cfg.get("response_modalities")
    if isinstance(modalities, str):
        modalities = [modalities]  # invalid for the API, but reserving too much is the safe side
    if isinstance(modalities, list) and any(isinstance(m, str) and m.upper() == "IMAGE" for m in modalities):
        return True
    model = path_model.lower().rsplit("/", 1)[-1]
    return "image" in model or model.startswith("imagen")
