"""The document's image generation body and the request policy agree: a body the
model takes, the policy takes, and one it refuses, the policy refuses (the policy
rules on the hot path; the model describes it in /openapi.json)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import config
from proxy.errors import InvalidRequest
from proxy.policy import RequestPolicy
from proxy.schemas import ImageGeneration, validated

SETTINGS = config.load(path=os.devnull, env={})
# n above 1 is a type-valid request the default n policy refuses on purpose: strip it.
POLICY = RequestPolicy(dataclasses.replace(SETTINGS.policy, n="strip"))
NAMES = sorted({m.name for m in SETTINGS.policy.models} | set(SETTINGS.policy.model_aliases))
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 12), st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=2), st.text(max_size=5),
)  # fmt: skip
bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.sampled_from(NAMES), junk.filter(lambda v: not isinstance(v, str))),
        "prompt": st.one_of(st.text(max_size=20), st.sampled_from([" ", "\t\n", "a fox"]), junk),
        "size": st.one_of(
            st.sampled_from(["auto", "2048x1152", "2048 × 1152", "1024x1024", "1280x1280"]),
            junk.filter(lambda v: not isinstance(v, str)),
        ),
        "response_format": st.one_of(st.sampled_from(["url", "b64_json", "png", ""]), junk),
        "n": junk,
        "stream": junk,
        "quality": junk,
        "user": junk,
        "mask": junk,
        "aspect_ratio": junk,
        "unknown_field": junk,
    },
)


def accepted_by_model(body: dict[str, Any]) -> bool:
    try:
        validated(ImageGeneration, body)
    except InvalidRequest:
        return False
    return True


def accepted_by_policy(body: dict[str, Any]) -> bool:
    try:
        POLICY.generation(body)
    except InvalidRequest:
        return False
    return True


@settings(max_examples=600, derandomize=True, database=None)
@given(bodies)
def test_the_generation_model_and_the_policy_take_the_same_bodies(body: dict[str, Any]) -> None:
    assert accepted_by_model(body) == accepted_by_policy(body), body


def test_the_model_names_the_field_the_policy_names() -> None:
    for body, param in (
        ({}, "prompt"),
        ({"prompt": " "}, "prompt"),
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": "x", "stream": True}, "stream"),
        ({"prompt": "x", "mask": "m.png"}, "mask"),
        ({"prompt": "x", "response_format": "png"}, "response_format"),
    ):
        for check in (lambda b: validated(ImageGeneration, b), POLICY.generation):
            try:
                check(body)
            except InvalidRequest as error:
                assert error.param == param, (body, check)
            else:
                raise AssertionError(body)
