"""The request policy and the size tables, in-process: a client body in, an upstream body out."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.config import ModelSettings, PolicySettings
from proxy.errors import InvalidRequest, ProxyError
from proxy.fake_upstream import check_generation
from proxy.policy import (
    BYTES_PER_PROMPT_CHAR,
    OTHER_FIELDS_BYTES,
    Decision,
    FieldAction,
    RequestPolicy,
    body_limit,
    field_action,
)
from proxy.sizes import VIP_SIZES, SizeTable, normalise_size, parse

# SPEC section 2, in its ratio order, written out here rather than imported.
SPEC_VIP_SIZES = """
1280x1280 848x1280 1280x848 960x1280 1280x960 1024x1280 1280x1024 720x1280 1280x720 1280x544
2048x2048 1360x2048 2048x1360 1536x2048 2048x1536 1632x2048 2048x1632 1152x2048 2048x1152 2048x864
2880x2880 2336x3520 3520x2336 2480x3312 3312x2480 2560x3216 3216x2560 2160x3840 3840x2160 3840x1632
""".split()
MODELS = ("gpt-image-2-vip", "gpt-image-2-all")
FULL_WIDTH = {ord("0") + d: 0xFF10 + d for d in range(10)}
WIDE_2048, WIDE_1152 = "2048".translate(FULL_WIDTH), "1152".translate(FULL_WIDTH)
# SPEC section 5's two kinds of fields the upstream does not take, written out here.
COSMETIC_FIELDS = ("quality", "style", "moderation", "user", "some_unknown_field")
PICTURE_FIELDS = (
    "mask",
    "background",
    "output_format",
    "output_compression",
    "aspect_ratio",
    "partial_images",
)
UNSUPPORTED = (*COSMETIC_FIELDS, *PICTURE_FIELDS)


def make_policy(**fields: Any) -> RequestPolicy:
    return RequestPolicy(PolicySettings(**fields))


def decide(body: dict[str, Any], **fields: Any) -> Decision:
    return make_policy(**fields).generation(body)


def refused(body: object, **fields: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        make_policy(**fields).generation(body)
    assert info.value.status == 400
    return info.value


def full(**extra: Any) -> dict[str, Any]:
    """A body that needs no adjustment, plus ``extra``."""
    return {"model": "gpt-image-2-vip", "prompt": "a lighthouse", "response_format": "url", **extra}


# size --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "2048×1152",
        "2048X1152",
        "2048*1152",
        "2048✕1152",
        "2048✖1152",
        "2048 × 1152",
        " 2048 × 1152 ",
        "2048 x 1152",
        "\t2048\u3000×\u30001152\n",
        WIDE_2048 + "×" + WIDE_1152,
        WIDE_2048 + "\uff58" + WIDE_1152,  # full-width x
        WIDE_2048 + "\uff0a" + WIDE_1152,  # full-width *
    ],
)
def test_size_separators_become_ascii_x(raw: str) -> None:
    decision = decide(full(size=raw))
    assert decision.body["size"] == "2048x1152"
    assert decision.adjustments == ("size=2048x1152",)
    assert normalise_size(raw) == "2048x1152"


def test_plain_size_is_not_reported() -> None:
    decision = decide(full(size="2048x1152"))
    assert decision.body == {
        "model": "gpt-image-2-vip",
        "prompt": "a lighthouse",
        "size": "2048x1152",
        "response_format": "url",
    }
    assert decision.adjustments == ()
    assert decision.adjusted_header is None


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("raw", ["auto", " AUTO ", "Auto"])
def test_auto_passes_for_both_models(model: str, raw: str) -> None:
    decision = decide(full(model=model, size=raw))
    assert decision.body["size"] == "auto"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("body", [{}, {"size": None}])
def test_absent_size_is_left_to_the_upstream(model: str, body: dict[str, Any]) -> None:
    decision = decide(full(model=model, **body))
    assert "size" not in decision.body
    assert decision.adjustments == ()


@pytest.mark.parametrize(
    ("openai", "tier"),
    [
        ("1024x1024", "1280x1280"),
        ("1536x1024", "1280x848"),
        ("1024x1536", "848x1280"),
        ("1024×1024", "1280x1280"),
        (" 1536 X 1024 ", "1280x848"),
    ],
)
def test_openai_sizes_map_to_the_same_ratio_tier(openai: str, tier: str) -> None:
    decision = decide(full(size=openai))
    assert decision.body["size"] == tier
    assert decision.adjusted_header == f"size={tier}"


def test_openai_sizes_pass_unchanged_where_the_model_takes_them() -> None:
    decision = decide(full(model="gpt-image-2-all", size="1536x1024"))
    assert decision.body["size"] == "1536x1024"
    assert decision.adjustments == ()


def test_size_aliases_come_from_settings() -> None:
    decision = decide(full(size="1024x1024"), size_aliases={"1024x1024": "2048x2048"})
    assert decision.body["size"] == "2048x2048"
    error = refused(full(size="1024x1024"), size_aliases={})
    assert error.param == "size"


@pytest.mark.parametrize(
    ("raw", "nearest"),
    [
        ("999x999", "1280x1280"),
        ("2048x1153", "2048x1152"),
        ("3840x2161", "3840x2160"),
        ("850x1280", "848x1280"),
    ],
)
def test_unknown_size_is_400_naming_the_nearest_sizes(raw: str, nearest: str) -> None:
    error = refused(full(size=raw))
    assert error.param == "size"
    assert error.code == "invalid_size"
    assert nearest in error.message
    assert "auto" in error.message


@pytest.mark.parametrize(
    "raw", ["", "   ", "big", "2048", "2048x", "x1152", "2048x1152x2", "2048:1152", "0x1280"]
)
def test_unparsable_size_is_400(raw: str) -> None:
    error = refused(full(size=raw))
    assert error.param == "size"
    assert "1280x1280" in error.message  # the first valid sizes are offered


@pytest.mark.parametrize("raw", [2048, 20.48, True, ["2048x1152"], {"w": 2048}])
def test_non_string_size_is_400(raw: object) -> None:
    assert refused(full(size=raw)).param == "size"


def test_vip_table_is_the_specs_thirty_sizes() -> None:
    assert list(VIP_SIZES) == SPEC_VIP_SIZES
    assert len(set(VIP_SIZES)) == 30


@pytest.mark.parametrize("size", SPEC_VIP_SIZES)
def test_every_vip_size_is_accepted_unchanged(size: str) -> None:
    decision = decide(full(size=size))
    assert decision.body["size"] == size
    assert decision.adjustments == ()


@pytest.mark.parametrize(
    "size", ["512x512", "1536x1536", "1536x1024", "1024x1536", "1024x1024", "512x64", "700x1000"]
)
def test_all_model_takes_a_long_edge_of_512_to_1536(size: str) -> None:
    decision = decide(full(model="gpt-image-2-all", size=size))
    assert decision.body["size"] == size


@pytest.mark.parametrize(
    "size", ["511x511", "1537x1024", "1024x1537", "2048x2048", "2048x1152", "100x100"]
)
def test_all_model_refuses_other_long_edges(size: str) -> None:
    error = refused(full(model="gpt-image-2-all", size=size))
    assert error.param == "size"
    suggested = re.findall(r"\d+x\d+", error.message.split("nearest valid sizes:")[1])
    assert suggested
    for candidate in suggested:
        assert 512 <= max(parse(candidate) or (0, 0)) <= 1536


def test_explicit_model_sizes_replace_the_builtin_table() -> None:
    models = (ModelSettings("gpt-image-2-vip", sizes=("1000x1000",)),)
    assert decide(full(size="1000x1000"), models=models).body["size"] == "1000x1000"
    assert refused(full(size="1280x1280"), models=models).param == "size"


def test_size_table_helpers() -> None:
    assert parse("2048x1152") == (2048, 1152)
    assert parse("2048x1152\n") is None
    assert parse("02048x1152") is None
    assert parse("2048X1152") is None
    vip = SizeTable.for_model(ModelSettings("gpt-image-2-vip"))
    assert vip.nearest("2000x1100", k=2) == ["2048x1152", "2048x1360"]
    # The closest of every shape and area first, not merely the closest shape.
    assert vip.nearest("850x1280", k=1) == ["848x1280"]
    assert vip.nearest("999x999", k=1) == ["1280x1280"]
    assert SizeTable.for_model(ModelSettings("gpt-image-2-all")).long_edge == (512, 1536)
    assert SizeTable.for_model(ModelSettings("gpt-image-2-all")).nearest("3072x1536") == [
        "1536x768"
    ]


# n -----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["reject", "strip", "fanout"])
@pytest.mark.parametrize("body", [{}, {"n": 1}, {"n": None}])
def test_absent_or_single_n_is_removed(policy: str, body: dict[str, Any]) -> None:
    decision = decide(full(**body), n=policy)
    assert "n" not in decision.body
    assert (decision.images, decision.calls) == (1, 1)


def test_n_above_one_is_rejected_by_default() -> None:
    error = refused(full(n=3))
    assert error.param == "n"
    assert error.code == "n_not_supported"
    assert "bills" in error.message and "one" in error.message


def test_n_strip_sends_and_charges_one() -> None:
    decision = decide(full(n=3), n="strip")
    assert "n" not in decision.body
    assert (decision.images, decision.calls) == (1, 1)
    assert decision.adjusted_header == "n=1; dropped=n"


@pytest.mark.parametrize("n", [2, 5, 10])
def test_n_fanout_makes_n_calls_of_one(n: int) -> None:
    decision = decide(full(n=n), n="fanout")
    assert "n" not in decision.body
    assert (decision.images, decision.calls) == (n, n)


@pytest.mark.parametrize("policy", ["reject", "strip", "fanout"])
@pytest.mark.parametrize("n", [1.5, 2.0, True, False, 0, -1, 11, 1000, "2", "1", [2], {"n": 2}])
def test_n_outside_1_to_10_is_400(policy: str, n: object) -> None:
    error = refused(full(n=n), n=policy)
    assert error.param == "n"


# other fields ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "setting", "action"),
    [
        # What the upstream takes, and what the policy rules on itself, whatever the value.
        *[(name, "x", setting, FieldAction.KEEP)
          for name in ("model", "prompt", "size", "response_format", "n", "stream")
          for setting in ("strip", "reject")],
        ("n", None, "reject", FieldAction.KEEP),
        # Cosmetic and unknown fields follow the setting.
        *[(name, value, "strip", FieldAction.DROP)
          for name in COSMETIC_FIELDS for value in ("high", None, 0, "")],
        *[(name, value, "reject", FieldAction.REFUSE)
          for name in COSMETIC_FIELDS for value in ("high", None, 0, "")],
        # SPEC names no input_fidelity: an unknown field like any other.
        ("input_fidelity", "high", "strip", FieldAction.DROP),
        ("input_fidelity", "high", "reject", FieldAction.REFUSE),
        ("Mask", "x", "strip", FieldAction.DROP),
        ("image", "x", "strip", FieldAction.DROP),  # as JSON: no edit, an unknown field
        # Fields whose loss bills another picture: refused whatever the setting and the
        # value, a form's empty string (a mask file part) and false or 0 included.
        *[(name, value, setting, FieldAction.REFUSE_PICTURE)
          for name in PICTURE_FIELDS
          for value in ("transparent", "", 0, False, [], {"image_url": "x"}, ["x"])
          for setting in ("strip", "reject")],
        # An explicit null asks for nothing: losing it changes nothing.
        *[(name, None, "strip", FieldAction.DROP) for name in PICTURE_FIELDS],
        *[(name, None, "reject", FieldAction.REFUSE) for name in PICTURE_FIELDS],
    ],
)  # fmt: skip
def test_field_action_table(name: str, value: object, setting: str, action: FieldAction) -> None:
    assert field_action(name, value, setting) is action  # type: ignore[arg-type]


@pytest.mark.parametrize("field", COSMETIC_FIELDS)
def test_unsupported_fields_are_stripped_and_reported(field: str) -> None:
    decision = decide(full(**{field: "high"}))
    assert field not in decision.body
    assert decision.adjusted_header == f"dropped={field}"


@pytest.mark.parametrize("field", COSMETIC_FIELDS)
def test_unsupported_fields_are_400_under_reject(field: str) -> None:
    error = refused(full(**{field: "high"}), unsupported_fields="reject")
    assert error.param == field
    assert error.code == "unsupported_field"


@pytest.mark.parametrize("setting", ["strip", "reject"])
@pytest.mark.parametrize("field", PICTURE_FIELDS)
def test_fields_that_change_the_picture_are_400_whatever_the_setting(
    setting: str, field: str
) -> None:
    for value in ("transparent", "webp", 50, True):
        error = refused(full(**{field: value}), unsupported_fields=setting)
        assert (error.param, error.code) == (field, "unsupported_field")
        assert "does not take it" in error.message
        assert "different picture" in error.message
    with pytest.raises(InvalidRequest) as info:
        make_policy(unsupported_fields=setting).edit({"prompt": "x", field: ""})
    assert info.value.param == field
    assert "different picture" in info.value.message


@pytest.mark.parametrize("field", PICTURE_FIELDS)
def test_a_null_picture_field_asks_for_nothing_and_is_dropped(field: str) -> None:
    decision = decide(full(**{field: None}))
    assert field not in decision.body
    assert decision.adjusted_header == f"dropped={field}"
    error = refused(full(**{field: None}), unsupported_fields="reject")
    assert error.param == field
    assert "different picture" not in error.message


@pytest.mark.parametrize("setting", ["strip", "reject"])
def test_a_field_that_changes_the_picture_is_named_first(setting: str) -> None:
    """Each refusal names one field, whatever the client's key order: one that no
    setting lets through before one the setting refuses, then in name order."""
    body = full(moderation="low", user="u", output_format="jpeg", mask="m")
    for order in (body, dict(reversed(body.items()))):
        error = refused(order, unsupported_fields=setting)
        assert error.param == "mask"
        assert "different picture" in error.message
    error = refused(full(user="u", moderation="low", zzz=1), unsupported_fields="reject")
    assert error.param == "moderation"
    assert error.message == "The field 'moderation' is not supported by the upstream; remove it."
    error = refused(full(zzz=1), unsupported_fields="reject")
    assert error.message == "The field 'zzz' is unknown; remove it."


def test_field_names_in_the_header_are_a_safe_token() -> None:
    body = full(**{"a\r\nSet-Cookie: x=1": 1, "naïve; b": 2, "ok_name[]": 3, "": 4})
    header = decide(body).adjusted_header
    assert header is not None
    assert header.isascii() and header.isprintable()
    assert "\n" not in header and "Set-Cookie: " not in header
    assert header.count(";") == 0
    assert "ok_name[]" in header


def test_stream_true_is_400_and_false_is_dropped() -> None:
    for policy in ("strip", "reject"):
        error = refused(full(stream=True), unsupported_fields=policy)
        assert error.param == "stream"
        decision = decide(full(stream=False), unsupported_fields=policy)
        assert "stream" not in decision.body
        assert decision.adjusted_header == "dropped=stream"


@pytest.mark.parametrize("default", ["b64_json", "url"])
def test_response_format_defaults_and_is_always_sent(default: str) -> None:
    body = full()
    del body["response_format"]
    decision = decide(body, default_response_format=default)
    assert decision.body["response_format"] == default
    assert decision.response_format == default
    assert decision.adjustments == (f"response_format={default}",)
    assert decide(body).body["response_format"] == "b64_json"


@pytest.mark.parametrize("value", ["url", "b64_json"])
def test_response_format_is_kept(value: str) -> None:
    decision = decide(full(response_format=value))
    assert decision.body["response_format"] == value
    assert decision.adjustments == ()


@pytest.mark.parametrize("value", ["png", "URL", "b64", "", 1, True, ["url"]])
def test_other_response_formats_are_400(value: object) -> None:
    assert refused(full(response_format=value)).param == "response_format"


def test_a_value_too_long_to_print_is_still_a_400() -> None:
    error = refused(full(response_format=10**5000))
    assert error.param == "response_format"
    assert "<int>" in error.message


def test_model_default_and_aliases() -> None:
    body = full()
    del body["model"]
    decision = decide(body)
    assert decision.model == decision.body["model"] == "gpt-image-2-vip"
    assert decision.adjustments == ("model=gpt-image-2-vip",)
    assert decide(body, default_model="gpt-image-2-all").body["model"] == "gpt-image-2-all"
    assert decide(full(model="gpt-image-1")).body["model"] == "gpt-image-2-vip"
    assert decide(full(model="gpt-image-1-mini")).body["model"] == "gpt-image-2-all"
    assert decide(full(model="dall-e-3")).adjusted_header == "model=gpt-image-2-vip"
    for name in MODELS:
        assert decide(full(model=name)).body["model"] == name


@pytest.mark.parametrize("model", ["dall-e-9", "GPT-IMAGE-2-VIP", "", "gpt-image-2"])
def test_unknown_model_is_model_not_found(model: str) -> None:
    error = refused(full(model=model))
    assert error.code == "model_not_found"
    assert error.param == "model"
    assert "gpt-image-2-vip" in error.message


@pytest.mark.parametrize("model", [5, ["gpt-image-2-vip"], True])
def test_non_string_model_is_400(model: object) -> None:
    assert refused(full(model=model)).param == "model"


@pytest.mark.parametrize("prompt", [None, "", "   \n", 5, ["a cat"], {"text": "a cat"}])
def test_prompt_must_be_a_non_empty_string(prompt: object) -> None:
    body = full(prompt=prompt)
    if prompt is None:
        del body["prompt"]
    assert refused(body).param == "prompt"


def test_prompt_length_limit() -> None:
    assert decide(full(prompt="x" * 32_000)).body["prompt"] == "x" * 32_000
    error = refused(full(prompt="x" * 32_001))
    assert (error.param, error.code) == ("prompt", "prompt_too_long")
    assert decide(full(prompt="  é\n  ")).body["prompt"] == "  é\n  "  # sent as written


@pytest.mark.parametrize("char", ["x", "é", "猫", "\U0001f431", "\u0000", "\U00020000"])
def test_prompt_length_counts_characters_in_any_script(char: str) -> None:
    policy = make_policy()
    assert policy.generation(full(prompt=char * 32_000)).body["prompt"] == char * 32_000
    assert policy.edit({"prompt": char * 32_000}).body["prompt"] == char * 32_000
    with pytest.raises(InvalidRequest) as info:
        policy.generation(full(prompt=char * 32_001))
    assert (info.value.param, info.value.code) == ("prompt", "prompt_too_long")
    with pytest.raises(InvalidRequest) as info:
        policy.edit({"prompt": char * 32_001})
    assert (info.value.param, info.value.code) == ("prompt", "prompt_too_long")


FLOOR = BYTES_PER_PROMPT_CHAR * 32_000 + OTHER_FIELDS_BYTES


@pytest.mark.parametrize(
    ("configured", "prompt_chars", "limit", "raised"),
    [
        (64 * 1024, 32_000, 400_384, True),  # the default: raised to fit any 32,000 characters
        (1024, 32_000, 400_384, True),
        (400_383, 32_000, 400_384, True),
        (400_384, 32_000, 400_384, False),
        (1_000_000, 32_000, 1_000_000, False),
        (64 * 1024, 1000, 64 * 1024, False),  # 12 x 1000 + 16384 = 28384 fits in 65536
        (1024, 1000, 28_384, True),
        (1024, 1, 16_396, True),
    ],
)
def test_body_limit_table(configured: int, prompt_chars: int, limit: int, raised: bool) -> None:
    result = body_limit(configured, prompt_chars, "policy.max_body_bytes")
    assert result.bytes == limit
    message = result.refusal().message
    assert f"limit of {limit} bytes" in message
    assert "policy.max_body_bytes" in message
    assert (f"each of the {prompt_chars} characters" in message) is raised
    assert result.refusal().status == 413


def test_default_body_limit_is_derived_from_the_prompt_limit() -> None:
    assert FLOOR == 400_384
    assert make_policy().body_limit.bytes == FLOOR
    assert make_policy(max_prompt_chars=50_000).body_limit.bytes == 12 * 50_000 + 16_384


@settings(max_examples=200, deadline=None)
@example("\U0001f431" * 32_000, True, 2)  # 12 bytes a character, indented
@example("\u0000" * 32_000, True, None)
@given(
    st.text(min_size=1, max_size=40).map(lambda t: (t * 32_000)[:32_000]),
    st.booleans(),
    st.sampled_from([None, 0, 2]),
)
def test_any_body_with_a_valid_prompt_fits_the_body_limit(
    prompt: str, ensure_ascii: bool, indent: int | None
) -> None:
    """However a JSON encoder writes a valid prompt, with every field OpenAI's API
    takes beside it, the body is within the limit (a 400 naming ``prompt``, or a
    decision, never a 413)."""
    body = {
        "model": "gpt-image-1-mini",
        "prompt": prompt,
        "size": "1536x1024",
        "n": 1,
        "quality": "high",
        "style": "vivid",
        "moderation": "low",
        "response_format": "b64_json",
        "user": "u" * 256,
        "stream": False,
    }
    raw = json.dumps(body, ensure_ascii=ensure_ascii, indent=indent).encode()
    assert len(raw) <= make_policy().body_limit.bytes


@pytest.mark.parametrize("body", [[], ["prompt"], "a cat", 5, None, True])
def test_body_must_be_an_object(body: object) -> None:
    assert refused(body).param is None


def test_adjusted_header_format() -> None:
    body = full(size="2048 × 1152", response_format="b64_json", n=1, quality="high")
    decision = decide(body)
    assert decision.adjusted_header == "size=2048x1152; dropped=n,quality"
    body = {"prompt": "x", "size": "1024x1024", "style": "vivid", "user": "u1", "n": 4}
    decision = decide(body, n="strip")
    assert decision.adjusted_header == (
        "model=gpt-image-2-vip; size=1280x1280; response_format=b64_json; n=1; dropped=n,style,user"
    )


def test_edit_form_fields_follow_the_same_policy() -> None:
    policy = make_policy()
    decision = policy.edit({"prompt": "merge", "size": "1280 × 1280", "n": "1"})
    assert decision.body == {
        "model": "gpt-image-2-vip",
        "prompt": "merge",
        "size": "1280x1280",
        "response_format": "b64_json",
    }
    assert policy.edit({"prompt": "x", "response_format": ""}).response_format == "b64_json"
    with pytest.raises(InvalidRequest) as info:
        policy.edit({"prompt": "x", "n": "2"})
    assert info.value.code == "n_not_supported"
    with pytest.raises(InvalidRequest) as info:
        policy.edit({"prompt": "x", "stream": "true"})
    assert info.value.param == "stream"
    fanout = RequestPolicy(replace(PolicySettings(), n="fanout"))
    assert fanout.edit({"prompt": "x", "n": " 3 "}).calls == 3


# Digits that str.isdigit() passes but a client cannot mean as a count: int() refuses
# some ("²") and reads others (fullwidth, Arabic-Indic, Devanagari, mathematical bold
# digits) as a number the client did not type.
ODD_DIGITS = (
    "²", "³", "¹", "⁵", "₂", "①", "1²",
    "\uff13", "\u0663", "\u0967", "\U0001d7d1", "\u0663\u0663",
)  # fmt: skip


@pytest.mark.parametrize("policy", ["reject", "strip", "fanout"])
@pytest.mark.parametrize("n", ODD_DIGITS)
def test_form_n_counts_only_ascii_digits(policy: str, n: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        make_policy(n=policy).edit({"prompt": "x", "n": n})
    assert info.value.param == "n"
    assert info.value.code == "invalid_request"


def test_form_n_of_many_digits_is_400() -> None:
    for n in ("9" * 5000, "0" * 30 + "1"):
        with pytest.raises(InvalidRequest) as info:
            make_policy(n="fanout").edit({"prompt": "x", "n": n})
        assert info.value.param == "n"


# properties --------------------------------------------------------------------------

FIELDS = ("model", "prompt", "size", "n", "response_format", "stream", *UNSUPPORTED)
SEPARATORS = (
    "x",
    "X",
    "×",
    "✕",
    "✖",
    "*",
    "\uff0a",
    "\uff58",
    "\uff38",
    " x ",
    "\t×\u3000",
    ":",
    "",
    "xx",
)
SPACE = st.sampled_from(["", " ", "  ", "\t", "\u3000", "\n"])
DIGITS = st.one_of(
    st.integers(min_value=0, max_value=5000).map(str),
    st.integers(min_value=0, max_value=5000).map(lambda i: str(i).translate(FULL_WIDTH)),
    st.text(alphabet=st.characters(categories=["Nd"]), min_size=1, max_size=5),
)
# Real sizes as clients write them: any separator, spacing and width of digits.
WRITTEN = st.tuples(
    SPACE,
    st.sampled_from([*SPEC_VIP_SIZES, "1024x1024", "1536x1024", "700x1400", "1600x900"]),
    st.sampled_from(SEPARATORS),
    st.booleans(),
    SPACE,
).map(lambda t: t[0] + (t[1].translate(FULL_WIDTH) if t[3] else t[1]).replace("x", t[2]) + t[4])
SIZES = st.one_of(
    st.sampled_from([*SPEC_VIP_SIZES, "auto", "AUTO", "1024x1024", "1536x1024", "1024x1536"]),
    WRITTEN,
    st.tuples(SPACE, DIGITS, st.sampled_from(SEPARATORS), DIGITS, SPACE).map("".join),
    st.tuples(SPACE, DIGITS, st.text(max_size=3), DIGITS, SPACE).map("".join),
    st.text(max_size=20),
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | SIZES,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)
PAYLOADS = st.fixed_dictionaries(
    {"prompt": st.text(max_size=40) | JSON},
    optional={
        "model": st.sampled_from([*MODELS, "gpt-image-1", "gpt-image-1-mini", "dall-e-9"]) | JSON,
        "size": SIZES | JSON,
        "n": st.integers(min_value=-1, max_value=12) | JSON,
        "response_format": st.sampled_from(["url", "b64_json", "png", None]) | JSON,
        "stream": st.booleans() | JSON,
        **{name: JSON for name in UNSUPPORTED},
    },
).flatmap(
    lambda body: st.dictionaries(st.text(max_size=10), JSON, max_size=3).map(
        lambda extra: {**extra, **body}
    )
)
# Mostly plausible bodies, so that many pass and the second property has work to do.
LIKELY = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=40)},
    optional={
        "model": st.sampled_from([*MODELS, "gpt-image-1", "gpt-image-1-mini", "dall-e-3"]),
        "size": st.sampled_from([*SPEC_VIP_SIZES, "512x512", "auto"]) | WRITTEN | SIZES,
        "n": st.integers(min_value=1, max_value=3),
        "response_format": st.sampled_from(["url", "b64_json"]),
        "stream": st.just(False),
    },
).flatmap(
    lambda body: st.dictionaries(st.sampled_from(UNSUPPORTED) | st.text(), JSON, max_size=2).map(
        lambda extra: {**extra, **body}
    )
)
# Multipart edit fields: every value is text, as a form carries it.
FORM_DIGITS = st.one_of(
    DIGITS,
    st.sampled_from(ODD_DIGITS),
    st.text(alphabet=st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=3),
)
FORM_TEXT = st.one_of(
    st.text(max_size=20),
    SIZES,
    st.tuples(SPACE, FORM_DIGITS, SPACE).map("".join),
    st.sampled_from(["", "url", "b64_json", "true", "false", "1", *MODELS, "gpt-image-1"]),
)
FORMS = st.fixed_dictionaries(
    {"prompt": FORM_TEXT},
    optional={name: FORM_TEXT for name in FIELDS if name != "prompt"},
).flatmap(
    lambda form: st.dictionaries(st.text(max_size=10), FORM_TEXT, max_size=3).map(
        lambda extra: {**extra, **form}
    )
)
LIKELY_FORMS = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=40)},
    optional={
        "model": st.sampled_from([*MODELS, "gpt-image-1", "gpt-image-1-mini", "dall-e-3"]),
        "size": st.sampled_from([*SPEC_VIP_SIZES, "512x512", "auto"]) | WRITTEN | SIZES,
        "n": st.tuples(
            SPACE, st.integers(min_value=1, max_value=3).map(str) | FORM_DIGITS, SPACE
        ).map("".join),
        "response_format": st.sampled_from(["url", "b64_json", ""]),
        "stream": st.sampled_from(["false", "0", ""]),
    },
)
SETTINGS = st.builds(
    PolicySettings,
    n=st.sampled_from(["reject", "strip", "fanout"]),
    unsupported_fields=st.sampled_from(["strip", "reject"]),
    default_response_format=st.sampled_from(["url", "b64_json"]),
)


@settings(max_examples=300, deadline=None)
@given(SETTINGS, PAYLOADS | JSON)
def test_any_payload_is_a_decision_or_a_4xx(config: PolicySettings, payload: object) -> None:
    decision_or_4xx(lambda: RequestPolicy(config).generation(payload))


def decision_or_4xx(decide: Callable[[], Decision]) -> None:
    try:
        decision = decide()
    except ProxyError as error:
        assert isinstance(error, InvalidRequest)
        assert 400 <= error.status < 500
        assert error.message
        assert error.body().startswith(b'{"error":')
    else:
        assert isinstance(decision, Decision)


@settings(max_examples=300, deadline=None)
@given(SETTINGS, LIKELY)
def test_what_passes_is_a_body_the_upstream_accepts(
    config: PolicySettings, payload: dict[str, Any]
) -> None:
    try:
        decision = RequestPolicy(config).generation(payload)
    except InvalidRequest:
        return
    body = decision.body
    assert check_generation(body) is None, body
    assert set(body) <= {"model", "prompt", "size", "response_format"}
    assert body["model"] in MODELS and decision.model == body["model"]
    assert body["response_format"] in ("url", "b64_json")
    assert body["response_format"] == decision.response_format
    assert isinstance(body["prompt"], str) and body["prompt"].strip()
    size = body.get("size")
    if size is not None and size != "auto":
        assert re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", size), size
        if body["model"] == "gpt-image-2-vip":
            assert size in SPEC_VIP_SIZES
        else:
            assert 512 <= max(int(edge) for edge in size.split("x")) <= 1536
    assert decision.images == decision.calls
    assert 1 <= decision.images <= 10
    if config.n != "fanout":
        assert decision.images == 1
    header = decision.adjusted_header
    assert header is None or (header.isascii() and header.isprintable())


@settings(max_examples=300, deadline=None)
@given(SETTINGS, FORMS)
def test_any_edit_form_is_a_decision_or_a_4xx(config: PolicySettings, form: dict[str, str]) -> None:
    decision_or_4xx(lambda: RequestPolicy(config).edit(form))


@settings(max_examples=300, deadline=None)
@given(SETTINGS, LIKELY_FORMS)
def test_what_passes_as_an_edit_form_is_a_body_the_upstream_accepts(
    config: PolicySettings, form: dict[str, str]
) -> None:
    try:
        decision = RequestPolicy(config).edit(form)
    except InvalidRequest:
        return
    body = decision.body
    assert check_generation(body) is None, body
    assert set(body) <= {"model", "prompt", "size", "response_format"}
    assert all(isinstance(value, str) for value in body.values())
    assert body["response_format"] == decision.response_format
    if "n" in form:
        # Only a count written in ASCII digits passes, and it is the count charged.
        written = form["n"].strip()
        assert written.isascii() and written.isdigit(), form["n"]
        if config.n == "fanout":
            assert decision.images == decision.calls == int(written)
    if config.n != "fanout":
        assert decision.images == 1
    header = decision.adjusted_header
    assert header is None or (header.isascii() and header.isprintable())
