"""Upstream error answers → the proxy's errors (SPEC section 6)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import orjson
import pytest

from proxy.errors import Unauthorized
from proxy.fake_upstream import FakeUpstream, create_fake_app, make_png
from proxy.metrics import UpstreamOutcome
from proxy.upstream_errors import KNOWN_CODES, UNKNOWN_CODE, Scrubber, key_refused, upstream_error

from .conftest import ADMIN_TOKEN, Proxy, ProxyProcess, ThreadServer
from .conftest import UPSTREAM_KEY as UPSTREAM_KEY_OF_TESTS

SECRETS = ("upstream-secret", "https://api.apiyi.com/v1")
SCRUB = Scrubber(SECRETS, ("api.apiyi.com",))
CALLER_KEY = "sk-" + "CallerOwnUpstreamKey" + "0123456789abcdef"


def body(message: str, code: str | None = None, type_: str = "new_api_error") -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": "", "code": code}})


def mapped(status: int, raw: bytes, passthrough: bool = False, **headers: str) -> dict:  # type: ignore[type-arg]
    error = upstream_error(
        status, raw, headers, scrub=SCRUB, caller_key=CALLER_KEY if passthrough else None
    ).error
    return {
        "status": error.status,
        "body": orjson.loads(error.body())["error"],
        "headers": {k.decode(): v.decode() for k, v in error.headers()},
    }


def test_4xx_keeps_status_and_is_not_retried() -> None:
    m = mapped(400, body("bad size (request id: abc)", "invalid_size"))
    assert m["status"] == 400
    assert m["body"]["code"] == "invalid_size"
    assert m["body"]["type"] == "invalid_request_error"
    assert m["body"]["param"] is None
    assert m["headers"]["x-should-retry"] == "false"


def test_moderation_451_keeps_status() -> None:
    m = mapped(451, body("blocked", "moderation_blocked"))
    assert (m["status"], m["body"]["code"]) == (451, "moderation_blocked")
    assert m["headers"]["x-should-retry"] == "false"


@pytest.mark.parametrize("status", [401, 403])
def test_own_key_refused_is_502_naming_no_key(status: int) -> None:
    m = mapped(status, body("invalid token upstream-secret at https://api.apiyi.com/v1"))
    assert m["status"] == 502 and m["body"]["code"] == "upstream_auth_failed"
    assert "upstream-secret" not in str(m) and "apiyi.com" not in str(m)


def test_quota_is_502_in_keys_mode_and_passes_in_passthrough() -> None:
    for status in (403, 429):
        m = mapped(status, body("quota", "insufficient_user_quota"))
        assert (m["status"], m["body"]["code"]) == (502, "upstream_quota_exhausted")
    m = mapped(403, body("quota", "insufficient_user_quota"), passthrough=True)
    assert m["status"] == 403


@pytest.mark.parametrize(
    ("status", "raw", "passthrough", "outcome"),
    [
        (403, body("quota", "insufficient_user_quota"), False, UpstreamOutcome.QUOTA),
        (429, body("quota", "insufficient_quota"), False, UpstreamOutcome.QUOTA),
        (500, body("quota", "quota_exceeded"), False, UpstreamOutcome.QUOTA),
        (401, body("bad token"), False, UpstreamOutcome.AUTH),
        (403, body("forbidden"), False, UpstreamOutcome.AUTH),
        # A passthrough caller's own account or key is the caller's, not the operator's.
        (403, body("quota", "insufficient_user_quota"), True, UpstreamOutcome.REFUSED),
        (401, body("bad token"), True, UpstreamOutcome.REFUSED),
        (429, body("busy", None, "rate_limit_error"), False, UpstreamOutcome.RATE_LIMITED),
        (400, body("blocked", "moderation_blocked"), False, UpstreamOutcome.REFUSED),
        (451, body("blocked"), True, UpstreamOutcome.REFUSED),
        (502, b"<html>bad gateway</html>", False, UpstreamOutcome.ERROR),
    ],
)
def test_each_upstream_answer_has_its_outcome(
    status: int, raw: bytes, passthrough: bool, outcome: UpstreamOutcome
) -> None:
    caller_key = CALLER_KEY if passthrough else None
    answered = upstream_error(status, raw, {}, scrub=SCRUB, caller_key=caller_key)
    assert answered.outcome is outcome


def test_the_operators_problems_promise_no_alert() -> None:
    for raw in (body("quota", "insufficient_user_quota"), body("bad token")):
        message = mapped(403, raw)["body"]["message"]
        assert "operator" in message and "alert" not in message


def test_429_busy_carries_retry_after() -> None:
    m = mapped(429, body("busy", None, "rate_limit_error"), **{"retry-after": "7"})
    assert m["status"] == 429 and m["body"]["type"] == "rate_limit_error"
    assert m["headers"]["retry-after"] == "7"
    assert m["headers"]["x-should-retry"] == "true"
    assert mapped(429, b"not json")["headers"]["retry-after"] == "5"


def test_5xx_is_502_and_may_be_retried() -> None:
    m = mapped(503, b"<html>oops</html>")
    assert m["status"] == 502 and m["headers"]["x-should-retry"] == "true"


def test_messages_never_carry_secrets_or_addresses() -> None:
    m = mapped(400, body("see https://api.apiyi.com/v1/x with upstream-secret"), passthrough=True)
    assert "upstream-secret" not in m["body"]["message"]
    assert "apiyi.com" not in m["body"]["message"]


@pytest.mark.parametrize(
    ("status", "raw"),
    [
        (401, body("Invalid token", "invalid_api_key")),
        (401, body("token expired (request id: abc)")),
        (401, body("bad", "some_code_of_its_own")),
        (401, b"<html>no</html>"),
        (403, body("key disabled", "invalid_api_key")),
    ],
)
def test_a_refused_passthrough_key_has_one_fixed_code(status: int, raw: bytes) -> None:
    error = upstream_error(status, raw, {}, scrub=SCRUB, caller_key=CALLER_KEY).error
    assert key_refused(error)
    assert (error.status, error.code) == (status, "invalid_api_key")
    m = mapped(status, raw, passthrough=True)
    assert m["headers"]["x-should-retry"] == "false"


@pytest.mark.parametrize(
    ("status", "raw", "passthrough"),
    [
        (403, body("user quota is not enough", "insufficient_user_quota"), True),
        (403, body("this token may not use the model"), True),
        (400, body("bad size", "invalid_size"), True),
        (401, body("Invalid token", "invalid_api_key"), False),  # the proxy's own key
    ],
)
def test_other_answers_do_not_refuse_the_key(status: int, raw: bytes, passthrough: bool) -> None:
    caller_key = CALLER_KEY if passthrough else None
    error = upstream_error(status, raw, {}, scrub=SCRUB, caller_key=caller_key).error
    assert not key_refused(error)


def test_the_proxys_own_401_is_not_an_upstream_refusal() -> None:
    assert not key_refused(Unauthorized("Incorrect API key provided."))


# scrubbing: every field of an upstream error is untrusted text -------------------------

UPSTREAM_KEY = "sk-" + "TheProxysOwnUpstreamKey" + "0123456789"
ECHOING = Scrubber((UPSTREAM_KEY, "http://10.1.2.3:8443/v1"), ("10.1.2.3:8443", "10.1.2.3"))


def echoing_body(leak: str) -> bytes:
    fields = {"message": f"bad {leak}", "type": leak, "param": leak, "code": leak}
    return orjson.dumps({"error": fields})


@pytest.mark.parametrize("status", [400, 404, 409, 422, 429, 451, 500, 503])
@pytest.mark.parametrize("passthrough", [False, True])
@pytest.mark.parametrize(
    "leak",
    [
        UPSTREAM_KEY,
        f"Bearer {UPSTREAM_KEY}",
        f"Authorization: Bearer {UPSTREAM_KEY} at http://10.1.2.3:8443/v1",
        CALLER_KEY,
        "10.1.2.3:8443",
    ],
)
def test_upstream_key_and_address_never_pass_in_any_field(
    status: int, passthrough: bool, leak: str
) -> None:
    error = upstream_error(
        status,
        echoing_body(leak),
        {},
        scrub=ECHOING,
        caller_key=CALLER_KEY if passthrough else None,
    ).error
    rendered = error.body().decode() + str(error.headers())
    for secret in (UPSTREAM_KEY, CALLER_KEY, "10.1.2.3", "8443", "Bearer sk-"):
        assert secret not in rendered
    fields = orjson.loads(error.body())["error"]
    assert (
        fields["code"] is None
        or fields["code"] in KNOWN_CODES
        or fields["code"]
        in (
            UNKNOWN_CODE,
            "upstream_error",
            "upstream_auth_failed",
            "rate_limit_exceeded",
        )
    )
    assert fields["param"] is None
    assert fields["type"] != leak


def test_codes_pass_only_from_the_vocabulary() -> None:
    known = upstream_error(400, body("blocked", "content_policy_violation"), {}, scrub=SCRUB).error
    assert known.code == "content_policy_violation"
    for code in ("invalid_size ", "its_own_code", "a" * 500, "code\nwith newline"):
        error = upstream_error(400, body("x", code), {}, scrub=SCRUB).error
        assert error.code == UNKNOWN_CODE
    assert upstream_error(400, body("x", None), {}, scrub=SCRUB).error.code is None


def test_param_passes_only_as_a_request_field_and_type_is_the_proxys() -> None:
    raw = orjson.dumps(
        {"error": {"message": "m", "type": "new_api_error", "param": "size", "code": None}}
    )
    error = upstream_error(400, raw, {}, scrub=SCRUB).error
    assert (error.param, error.type) == ("size", "invalid_request_error")
    raw = orjson.dumps({"error": {"message": "m", "type": "x", "param": "size; rm", "code": 1}})
    error = upstream_error(400, raw, {}, scrub=SCRUB).error
    assert (error.param, error.code) == (None, UNKNOWN_CODE)


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("dial tcp 10.0.0.5:443: connection refused", "10.0.0.5"),
        ("lookup redis.internal on [::1]:53: no such host", "redis.internal"),
        ("upstream api.apiyi.com:443 unreachable", "apiyi"),
        ("proxy at localhost:8080 failed", "8080"),
        ("fe80::1ff:fe23:4567:890a refused", "fe80"),
        ("token=abc123secret rejected", "abc123secret"),
        ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("key 8f3a9b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a was disabled", "8f3a9b7c6d5e"),
        ("pk_live_abcdef1234567 is not allowed", "pk_live"),
    ],
)
def test_messages_lose_addresses_and_secret_shapes(text: str, hidden: str) -> None:
    assert hidden not in SCRUB.text(text)


@pytest.mark.parametrize(
    "text",
    ["size 1024x1024 is not supported; try 2048x2048", "retry at 12:30:45", "model v1.2.3"],
)
def test_ordinary_messages_stay_readable(text: str) -> None:
    assert SCRUB.text(text) == text


def test_a_secret_cut_by_the_length_limit_is_still_hidden() -> None:
    text = "x" * 990 + UPSTREAM_KEY
    assert "sk-The" not in ECHOING.text(text)


# end to end: an upstream that echoes its bearer and address in every error field -------


ECHO_PROMPTS = [
    "[fake:moderation] x",
    "[fake:500] x",
    "[fake:429] x",
    "[fake:quota] x",
    "[fake:error200] x",
    "[fake:code=7] x",
]


def echo_calls(proxy: ProxyProcess, key: str) -> list[httpx.Response]:
    """Every kind of upstream error, through the proxy; each answer is printed, so the
    suite's search for secrets in test output reads it too."""
    answers = []
    with httpx.Client(timeout=30, headers={"authorization": f"Bearer {key}"}) as client:
        for prompt in ECHO_PROMPTS:
            answers.append(
                client.post(proxy.url + "/v1/images/generations", json={"prompt": prompt})
            )
        png = make_png()
        answers.append(
            client.post(
                proxy.url + "/v1/images/edits",
                data={"prompt": "[fake:code=8] x"},
                files={"image": ("a.png", png, "image/png")},
            )
        )
        answers.append(client.get(proxy.url + "/metrics"))
    for answer in answers:
        print(answer.status_code, dict(answer.headers), answer.text)
    return answers


def assert_nothing_leaked(texts: list[str], fake_server: ThreadServer) -> None:
    netloc = fake_server.url.removeprefix("http://")
    for text in texts:
        for secret in (UPSTREAM_KEY_OF_TESTS, netloc, f":{fake_server.port}", "Bearer sk-"):
            assert secret not in text


@pytest.mark.parametrize("mode", ["keys", "passthrough"])
def test_an_upstream_echoing_its_bearer_leaks_nothing(
    mode: str, proxy_process: Callable[..., ProxyProcess]
) -> None:
    state = FakeUpstream(api_key=UPSTREAM_KEY_OF_TESTS)
    state.echo_secrets = True
    with ThreadServer(create_fake_app(state)) as upstream:
        env = {
            "APIYI_PROXY_UPSTREAM_URL": upstream.url + "/v1",
            "APIYI_API_KEY": UPSTREAM_KEY_OF_TESTS,
            "APIYI_PROXY_ADMIN_TOKEN": ADMIN_TOKEN,
            "APIYI_PROXY_AUTH_MODE": mode,
            "APIYI_PROXY_LOG__LEVEL": "debug",
        }
        proxy = proxy_process(env)
        if mode == "keys":
            created = httpx.post(
                proxy.url + "/admin/keys",
                json={"name": "echo"},
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            )
            key = created.json()["key"]
        else:
            key = UPSTREAM_KEY_OF_TESTS  # the caller's own upstream key
        answers = echo_calls(proxy, key)
        # The upstream did echo: the fake saw every call.
        assert len(state.requests) == len(ECHO_PROMPTS) + 1
        assert [a.status_code for a in answers[:-1]] == (
            [400, 502, 429, 502, 502, 400, 400]
            if mode == "keys"
            else [400, 502, 429, 403, 502, 400, 400]
        )
        codes = {a.json()["error"]["code"] for a in answers[:-1]}
        assert codes <= KNOWN_CODES | {UNKNOWN_CODE, "rate_limit_exceeded", "upstream_error"} | {
            "upstream_quota_exhausted",
            "upstream_auth_failed",
        }
        proxy.stop()  # its output is complete (and searched for secrets) once it exits
        # Start-up names the configured upstream host for the operator (SPEC section 9),
        # once; past that line, nothing the upstream echoed may carry its address.
        lines = proxy.output().splitlines()
        startup = [i for i, line in enumerate(lines) if line.lstrip().startswith("upstream ")]
        assert len(startup) == 1, lines[:10]
        del lines[startup[0]]
        texts = [a.text + str(a.headers) for a in answers] + ["\n".join(lines)]
        assert_nothing_leaked(texts, upstream)


@pytest.mark.cases(1000)
def test_a_thousand_upstream_codes_make_a_bounded_number_of_series(
    fake: tuple[FakeUpstream, ThreadServer], start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(fake[1].url)
    key = proxy.new_key()

    def series() -> set[str]:
        text = httpx.get(proxy.url + "/metrics").text
        return {line.split(" ")[0] for line in text.splitlines() if not line.startswith("#")}

    with httpx.Client(timeout=30, headers={"authorization": f"Bearer {key}"}) as client:
        for n in range(1000):
            answer = client.post(
                proxy.url + "/v1/images/generations", json={"prompt": f"[fake:code={n}] x"}
            )
            assert answer.status_code == 400
            assert answer.json()["error"]["code"] == UNKNOWN_CODE
            if n == 9:
                series()  # the scrape's own series exist from here on
                after_ten = series()
    assert len(fake[0].requests) == 1000
    assert series() == after_ten
    assert not [s for s in after_ten if "code_" in s]
