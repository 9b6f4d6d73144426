"""The WWW-Authenticate parser behind registry auth (RFC 9110 §11.6.1 challenges)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hutch.images.registry import Challenge, parse_www_authenticate


def test_docker_hub_bearer_challenge() -> None:
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull"'
    )
    assert parse_www_authenticate(header) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/busybox:pull",
            },
        )
    ]


def test_commas_and_escapes_inside_quotes() -> None:
    (c,) = parse_www_authenticate(
        r'Bearer realm="https://a/t?x=1,y=2", scope="repository:a/b:pull,push", error="say \"hi\""'
    )
    assert c.params == {
        "realm": "https://a/t?x=1,y=2",
        "scope": "repository:a/b:pull,push",
        "error": 'say "hi"',
    }


def test_several_challenges_case_and_spacing() -> None:
    header = 'BASIC Realm = "reg" , Bearer realm=https://auth/token,service=reg'
    assert parse_www_authenticate(header) == [
        Challenge("basic", {"realm": "reg"}),
        Challenge("bearer", {"realm": "https://auth/token", "service": "reg"}),
    ]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("", []),
        ("Basic", [Challenge("basic")]),
        ("Negotiate abc+/=", [Challenge("negotiate", token68="abc+/=")]),
        ("Negotiate abc==, Basic realm=x", [
            Challenge("negotiate", token68="abc=="), Challenge("basic", {"realm": "x"})
        ]),
        ('Bearer realm=""', [Challenge("bearer", {"realm": ""})]),
        (",,, Basic ,,", [Challenge("basic")]),
    ],
)  # fmt: skip
def test_edge_cases(header: str, expected: list[Challenge]) -> None:
    assert parse_www_authenticate(header) == expected


def test_unterminated_quote_does_not_raise() -> None:
    out = parse_www_authenticate('Bearer realm="https://a/t, service=x')
    assert out and out[0].scheme == "bearer"


@given(st.text(max_size=200))
def test_never_raises(header: str) -> None:
    for c in parse_www_authenticate(header):
        assert c.scheme == c.scheme.lower()
