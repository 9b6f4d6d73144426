"""Image reference normalisation (docker-style) and the reasons given for invalid ones."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hutch.errors import BadRequestError, ParseError
from hutch.images.reference import ImageReference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "canonical", "api_host", "selector"),
    [
        ("busybox", "docker.io/library/busybox:latest", "registry-1.docker.io", "latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36", "registry-1.docker.io", "1.36"),
        ("library/busybox", "docker.io/library/busybox:latest", "registry-1.docker.io", "latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest", "registry-1.docker.io", "latest"),
        ("index.docker.io/org/app:v2", "docker.io/org/app:v2", "registry-1.docker.io", "v2"),
        (
            "python:3.12-slim",
            "docker.io/library/python:3.12-slim",
            "registry-1.docker.io",
            "3.12-slim",
        ),
        ("ghcr.io/org/team/app", "ghcr.io/org/team/app:latest", "ghcr.io", "latest"),
        ("localhost/app", "localhost/app:latest", "localhost", "latest"),
        ("localhost:5000/team/tool:1.2", "localhost:5000/team/tool:1.2", "localhost:5000", "1.2"),
        ("127.0.0.1:5000/x", "127.0.0.1:5000/x:latest", "127.0.0.1:5000", "latest"),
        ("[::1]:5000/x:y", "[::1]:5000/x:y", "[::1]:5000", "y"),
        (
            "Registry.Example.COM/a_b/c__d/e-f.g",
            "registry.example.com/a_b/c__d/e-f.g:latest",
            "registry.example.com",
            "latest",
        ),
        (f"busybox@{D}", f"docker.io/library/busybox@{D}", "registry-1.docker.io", D),
        (f"ghcr.io/o/a:1@{D}", f"ghcr.io/o/a:1@{D}", "ghcr.io", D),
    ],
)
def test_normalisation(text: str, canonical: str, api_host: str, selector: str) -> None:
    ref = ImageReference.parse(text)
    assert str(ref) == canonical
    assert ref.api_host == api_host
    assert ref.selector == selector
    assert ImageReference.parse(str(ref)) == ref  # canonical form is a fixed point


def test_familiar_form() -> None:
    assert ImageReference.parse("busybox").familiar() == "busybox:latest"
    assert ImageReference.parse("org/app:1").familiar() == "org/app:1"
    assert ImageReference.parse("localhost:5000/a").familiar() == "localhost:5000/a:latest"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        (" busybox", "white space"),
        ("Busybox", "lower-case"),
        ("busybox:", "tag ''"),
        ("busybox:-x", "tag '-x'"),
        ("busybox:" + "a" * 129, "tag"),
        ("busybox@sha256:1234", "ALGORITHM:HEX"),
        ("busybox@sha256:" + "AB" * 32, "64 lower-case"),
        ("a//b", "empty component"),
        ("ghcr.io/", "missing"),
        ("ghcr.io/a/", "empty component"),
        ("a..b", "may only hold"),
        ("a-/b", "may only hold"),
        ("localhost:99999/a", "out of range"),
        ("bad_host:5000/a", "not a valid HOST"),
        ("x" * 300, "longer than"),
        (":tag", "missing"),
    ],
)
def test_invalid_references_say_why(text: str, why: str) -> None:
    with pytest.raises(ParseError, match=why) as ei:
        ImageReference.parse(text)
    assert "NAME[:TAG]" in ei.value.hint
    assert isinstance(ei.value, BadRequestError) and ei.value.http_status == 400


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="abcAB09._-:/@[]", max_size=40) | st.text(max_size=20))
def test_any_text_parses_or_is_a_bad_request(text: str) -> None:
    try:
        ref = ImageReference.parse(text)
    except BadRequestError:
        return
    assert ImageReference.parse(str(ref)) == ref
