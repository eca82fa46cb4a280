"""Gemini through the gateway with the official `google-genai` SDK, against the fake upstream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest
from google import genai
from google.genai import errors, types

from gateway.events import event_quantities
from tests.conftest import GEMINI_KEY, Gateway, fixture_bytes, wait_until
from tests.fakes.upstream import FakeUpstream, Reply


def client(gw: Gateway, key: str) -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=f"{gw.url}/gemini"))


def test_generate_content_metered_with_thoughts(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("gina")
    gc = client(gateway, key)
    resp = gc.models.generate_content(model="gemini-2.5-flash", contents="Hello")
    assert resp.text == "Hello! How can I help you today?"
    gateway.wait_recorded("gina")
    assert gateway.events("gina") == {"gemini_input_tokens": 8, "gemini_output_tokens": 9 + 285}
    sent = upstream.requests[-1]
    assert sent.path == "/v1/models/gemini-2.5-flash:generateContent"
    assert sent.header("x-goog-api-key") == GEMINI_KEY
    assert key not in repr(sent.headers) and key not in sent.query


def test_stream_sse_last_usage_wins(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("gus")
    gc = client(gateway, key)
    chunks = list(gc.models.generate_content_stream(model="gemini-2.5-flash", contents="Hi"))
    assert "".join(c.text or "" for c in chunks) == "The quick brown fox jumps over the lazy dog."
    assert upstream.requests[-1].query == "alt=sse"
    rows = gateway.wait_recorded("gus")
    assert rows[0]["outcome"] == "ok" and rows[0]["stream"] == 1
    assert gateway.events("gus") == {"gemini_input_tokens": 8, "gemini_output_tokens": 10 + 286}


_SSE = fixture_bytes("gemini/stream_generate_content.sse")
_SECOND = _SSE.index(b"data: ", 1)  # the second event (" quick brown fox jumps")


@pytest.mark.parametrize(
    "cuts",
    [
        [],
        [_SSE.index(b"\r\n\r\n") + 1, _SSE.index(b"\r\n\r\n") + 3, _SSE.index(b"quick")],  # CRLFs split
        [_SECOND - 1, len(_SSE) - 1],  # the last read an LF alone
    ],
    ids=["one event a read", "split inside CRLFs", "split before LFs"],
)
def test_sse_relayed_byte_for_byte(gateway: Gateway, upstream: FakeUpstream, cuts: list[int]) -> None:
    # However the reads cut the events, the client gets the bytes as they were (held back until whole).
    key = gateway.issue_key("gil")
    if cuts:
        chunks = [_SSE[a:b] for a, b in zip([0, *cuts], [*cuts, len(_SSE)], strict=True)]
        upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")], chunks=chunks, delay_between=0.01))
    with httpx.Client(timeout=10) as http:
        resp = http.post(
            f"{gateway.url}/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key={key}",
            json={"contents": [{"parts": [{"text": "Hi"}], "role": "user"}]},
        )
    assert resp.status_code == 200
    assert resp.content == _SSE
    gateway.wait_recorded("gil")
    assert gateway.events("gil") == {"gemini_input_tokens": 8, "gemini_output_tokens": 296}


_FIRST_ONLY = (["The"], {"gemini_input_tokens": 8, "gemini_output_tokens": 286})
_CR_LF = _SSE.index(b"\r\n", _SECOND)  # the second event's data line ends here


@pytest.mark.parametrize(
    ("cut", "expected"),
    [
        (_SECOND, _FIRST_ONLY),
        (_SSE.index(b"quick"), _FIRST_ONLY),
        (_CR_LF + 1, _FIRST_ONLY),  # between the data line's CR and LF
        (_CR_LF + 2, _FIRST_ONLY),  # after the event's first line end
        (_CR_LF + 3, (["The", " quick brown fox jumps"], {"gemini_input_tokens": 8, "gemini_output_tokens": 291})),
    ],
    ids=["at a boundary", "in the data line", "between CR and LF", "after the line end", "before the last LF"],
)
@pytest.mark.parametrize("stall", [False, True], ids=["broken", "stalled"])
@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
def test_stream_cut_mid_event_ends_with_an_error_the_sdk_raises(
    make_gateway: Callable[..., Gateway],
    upstream: FakeUpstream,
    cut: int,
    expected: tuple[list[str], dict[str, int]],
    stall: bool,
    aio: bool,
) -> None:
    # The google-genai SDK reads `data:` lines until a blank one: a partial event relayed before the
    # error event would join it (a JSON decode error, not the gateway's error). It is held back; a
    # blank line cut between its CR and LF completes its event (as the meter reads it) once the
    # stream stops there.
    gateway = make_gateway(upstream_timeout_seconds=0.5)
    key = gateway.issue_key("cut")
    upstream.enqueue(Reply.cut(_SSE, cut, stall=stall))
    texts: list[str] = []
    gc = client(gateway, key)  # (held: a client collected mid-stream closes its connection)
    with pytest.raises(errors.ServerError) as err:
        if aio:
            asyncio.run(_stream_async(gc, texts))
        else:
            for chunk in gc.models.generate_content_stream(model="gemini-2.5-flash", contents="Hi"):
                texts.append(chunk.text or "")
    if stall:
        assert (err.value.code, err.value.status) == (504, "DEADLINE_EXCEEDED")
        assert err.value.message == "the provider stalled mid-response"
    else:
        assert (err.value.code, err.value.status) == (502, "UNAVAILABLE")
        assert err.value.message == "the provider connection broke mid-response"
    assert texts == expected[0]
    rows = gateway.wait_recorded("cut")
    assert rows[0]["outcome"] == ("timeout" if stall else "upstream_broken")
    assert gateway.events("cut") == expected[1]


async def _stream_async(gc: genai.Client, texts: list[str]) -> None:
    async for chunk in await gc.aio.models.generate_content_stream(model="gemini-2.5-flash", contents="Hi"):
        texts.append(chunk.text or "")


def test_json_array_stream_mode(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("gwen")
    upstream.enqueue(Reply.fixture("gemini/stream_generate_content_array.json", stream=True))
    with httpx.Client(timeout=10) as http:
        resp = http.post(
            f"{gateway.url}/gemini/v1/models/gemini-2.5-flash:streamGenerateContent",
            json={"contents": [{"parts": [{"text": "Hi"}]}]},
            headers={"x-goog-api-key": key},
        )
    assert resp.content == fixture_bytes("gemini/stream_generate_content_array.json")
    gateway.wait_recorded("gwen")
    assert gateway.events("gwen") == {"gemini_input_tokens": 8, "gemini_output_tokens": 296}


def test_cached_and_tool_use_tokens(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("gia")
    upstream.enqueue(Reply.fixture("gemini/generate_content_cached_tooluse.json"))
    gc = client(gateway, key)
    gc.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    gateway.wait_recorded("gia")
    assert gateway.events("gia") == {
        "gemini_input_tokens": 40120 - 40000 + 350,
        "gemini_cached_tokens": 40000,
        "gemini_output_tokens": 11 + 120,
    }


def test_image_output_counts_images_not_image_tokens(gateway: Gateway) -> None:
    key = gateway.issue_key("ivy")
    gc = client(gateway, key)
    resp = gc.models.generate_content(
        model="gemini-2.5-flash-image",
        contents="A red square",
        config=types.GenerateContentConfig(response_modalities=["TEXT", "IMAGE"]),
    )
    parts = resp.candidates[0].content.parts  # type: ignore[index,union-attr]
    assert any(p.inline_data for p in parts)  # type: ignore[union-attr]
    gateway.wait_recorded("ivy")
    assert gateway.events("ivy") == {"gemini_input_tokens": 7, "gemini_output_tokens": 10, "gemini_images": 1}
    ((rid, usage),) = gateway.query("SELECT id, usage FROM requests WHERE user_id = 'ivy'")
    # a COUNT meter: one event of 1 per image, each with its own external id
    assert [e for e in event_quantities(rid, json.loads(usage)) if e[1] == "gemini_images"] == [
        (f"{rid}:gemini_images:0", "gemini_images", 1)
    ]


def test_image_stream_sums_images(gateway: Gateway) -> None:
    key = gateway.issue_key("iris")
    gc = client(gateway, key)
    list(
        gc.models.generate_content_stream(
            model="gemini-2.5-flash-image",
            contents="A red square",
            config=types.GenerateContentConfig(response_modalities=["TEXT", "IMAGE"]),
        )
    )
    gateway.wait_recorded("iris")
    assert gateway.events("iris")["gemini_images"] == 1


def test_imagen_predict_counts_unfiltered_images(gateway: Gateway) -> None:
    key = gateway.issue_key("ines")
    with httpx.Client(timeout=10) as http:
        resp = http.post(
            f"{gateway.url}/gemini/v1beta/models/imagen-4.0-generate-001:predict",
            json={"instances": [{"prompt": "A red square"}], "parameters": {"sampleCount": 2}},
            headers={"x-goog-api-key": key},
        )
    assert resp.status_code == 200 and resp.content == fixture_bytes("gemini/imagen_predict.json")
    gateway.wait_recorded("ines")
    assert gateway.events("ines") == {"gemini_images": 2}


def test_count_tokens_is_free(gateway: Gateway) -> None:
    key = gateway.issue_key("cleo")
    gc = client(gateway, key)
    resp = gc.models.count_tokens(model="gemini-2.5-flash", contents="Hello")
    assert resp.total_tokens == 9
    assert gateway.events("cleo") == {} and gateway.requests("cleo") == []


def test_invalid_key_raises_client_error_401(gateway: Gateway, upstream: FakeUpstream) -> None:
    before = len(upstream.requests)
    with pytest.raises(errors.ClientError) as err:
        gc = client(gateway, "pgw_wrong")
        gc.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    assert err.value.code == 401 and err.value.status == "UNAUTHENTICATED"
    assert len(upstream.requests) == before


def test_upstream_error_passes_through_unmetered(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("eve")
    upstream.enqueue(Reply.fixture("gemini/error_503_unavailable.json"))
    with pytest.raises(errors.ServerError) as err:
        gc = client(gateway, key)
        gc.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    assert err.value.code == 503
    rows = gateway.wait_recorded("eve")
    assert rows[0]["status_code"] == 503 and rows[0]["outcome"] == "upstream_error"
    assert gateway.events("eve") == {}


def test_midstream_error_bills_partial_usage(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("max")
    upstream.enqueue(Reply.fixture("gemini/stream_error_midstream.sse"))
    with pytest.raises(errors.ServerError) as err:
        gc = client(gateway, key)
        list(gc.models.generate_content_stream(model="gemini-2.5-flash", contents="Hi"))
    assert err.value.code == 503
    rows = gateway.wait_recorded("max")
    assert rows[0]["outcome"] == "upstream_error_midstream"
    assert gateway.events("max") == {"gemini_input_tokens": 8, "gemini_output_tokens": 286}


async def test_async_client(gateway: Gateway) -> None:
    key = gateway.issue_key("ava")
    gc = client(gateway, key)
    resp = await gc.aio.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    assert resp.usage_metadata.prompt_token_count == 8  # type: ignore[union-attr]


def test_caps_beyond_64_bits_are_reserved_at_the_ceiling_and_leave_nothing_reserved(make_gateway) -> None:  # type: ignore[no-untyped-def]
    # An output cap times the candidates beyond 64 bits: the reservation is bounded per meter (the
    # journal's JSON could not hold it), the request forwarded for the provider to judge, and once it
    # is answered nothing it reserved stays reserved. (A begin the journal still cannot encode gives
    # everything back: tests/billing/test_owner.py.)
    gw: Gateway = make_gateway(plan={"gemini_input_tokens": 100_000})
    key = gw.issue_key("huge")
    config = types.GenerateContentConfig(max_output_tokens=2**64 - 1, candidate_count=2)
    gc = client(gw, key)
    gc.models.generate_content(model="gemini-2.5-flash", contents="Hello", config=config)
    wait_until(lambda: gw.meter(key, "gemini_input_tokens")["reserved"] == 0)
