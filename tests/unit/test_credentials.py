"""Registry settings: hutch's config.toml, Docker's config.json, credential helpers, precedence."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from hutch.errors import ConfigError
from hutch.images.credentials import RegistryEntry, RegistrySettings, normalize_registry
from hutch.paths import HutchPaths


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[HutchPaths, Path]:
    """An empty hutch home and Docker config folder (DOCKER_CONFIG points at it)."""
    home, docker = tmp_path / "home", tmp_path / "docker"
    home.mkdir()
    docker.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ.get("PATH", ""))
    return HutchPaths(home), docker


def hutch_config(paths: HutchPaths, text: str) -> None:
    (paths.home / "config.toml").write_text(text)


def docker_config(folder: Path, doc: object) -> None:
    (folder / "config.json").write_text(json.dumps(doc))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("key", "normal"),
    [
        ("https://index.docker.io/v1/", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("docker.io", "docker.io"),
        ("https://Registry.Example.com:5000/v2/", "registry.example.com:5000"),
        ("http://localhost:5000", "localhost:5000"),
        ("[::1]:5000", "[::1]:5000"),
    ],
)
def test_normalize_registry(key: str, normal: str) -> None:
    assert normalize_registry(key) == normal


def test_nothing_configured(env: tuple[HutchPaths, Path]) -> None:
    s = RegistrySettings.load(env[0])
    assert s.for_registry("ghcr.io") == RegistryEntry()
    for loopback in ("localhost:5000", "127.0.0.1:5000", "[::1]:5000", "localhost"):
        assert s.for_registry(loopback).insecure is True
    assert s.for_registry("registry.lan:5000").insecure is False


def test_hutch_config(env: tuple[HutchPaths, Path], tmp_path: Path) -> None:
    paths, _ = env
    (paths.home / "ca.pem").write_text("not checked at load time")
    (tmp_path / "pw").write_text("s3cret\n")
    hutch_config(
        paths,
        f"""
[registries."registry.lan:5000"]
insecure = true
username = "ci"
password_file = "{tmp_path / 'pw'}"

[registries."127.0.0.1:5443"]
ca_file = "ca.pem"            # relative to the config file's folder

[registries."localhost:6000"]
insecure = false

[registries."docker.io"]
username = "hubuser"
password = "hubpass"
""",
    )
    s = RegistrySettings.load(paths)
    lan = s.for_registry("registry.lan:5000")
    assert (lan.insecure, lan.username, lan.password) == (True, "ci", "s3cret")
    assert lan.has_credentials
    tls = s.for_registry("127.0.0.1:5443")
    assert tls.ca_file == paths.home / "ca.pem" and tls.insecure is False  # a CA means TLS
    assert s.for_registry("localhost:6000").insecure is False
    hub = s.for_registry("registry-1.docker.io")  # ref.api_host works as well as ref.registry
    assert (hub.username, hub.password) == ("hubuser", "hubpass")
    assert "hubpass" not in repr(hub)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('registries = "x"', "'registries' must be a table"),
        ('[registries]\n"a.io" = 1', '[registries."a.io"] must be a table'),
        ('[registries."a.io"]\ninsecur = true', "unknown key(s) insecur"),
        ('[registries."a.io"]\ninsecure = "yes"', "insecure must be true or false"),
        ('[registries."a.io"]\nca_file = "/nonexistent/ca.pem"', "ca_file '/nonexistent/ca.pem'"),
        ('[registries."a.io"]\nca_file = 3', "ca_file must be a path"),
        ('[registries."a.io"]\nusername = "u"', "username and password"),
        ('[registries."a.io"]\npassword = "p"', "username and password"),
        ('[registries."a.io"]\nusername = 5\npassword = "p"', "username must be"),
        ('[registries."a.io"]\nusername = "u"\npassword = "p"\npassword_file = "f"', "not both"),
        ('[registries."a.io"]\nusername = "u"\npassword_file = "/nonexistent"', "password_file"),
        ("[registries\n", "not valid TOML"),
    ],
)
def test_invalid_hutch_config_names_file_and_key(
    env: tuple[HutchPaths, Path], text: str, fragment: str
) -> None:
    paths, _ = env
    hutch_config(paths, text)
    with pytest.raises(ConfigError) as e:
        RegistrySettings.load(paths)
    assert str(paths.home / "config.toml") in e.value.message
    assert fragment in e.value.message


def test_docker_config(env: tuple[HutchPaths, Path]) -> None:
    paths, docker = env
    docker_config(
        docker,
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": b64("hub:pa:ss")},
                "ghcr.io": {"username": "gh", "password": "tok"},
                "https://quay.io": {"identitytoken": "refresh-me"},
                "empty.io": {},
                "blank-auth.io": {"auth": ""},
            },
            "credsStore": "",
            "HttpHeaders": {"User-Agent": "x"},
        },
    )
    s = RegistrySettings.load(paths)
    hub = s.for_registry("docker.io")
    assert (hub.username, hub.password) == ("hub", "pa:ss")  # only the first colon splits
    assert s.for_registry("registry-1.docker.io") == hub
    assert (s.for_registry("ghcr.io").username, s.for_registry("ghcr.io").password) == ("gh", "tok")
    quay = s.for_registry("quay.io")
    assert quay.identity_token == "refresh-me" and quay.has_credentials
    assert not s.for_registry("empty.io").has_credentials
    assert not s.for_registry("blank-auth.io").has_credentials


def test_hutch_config_wins_over_docker(env: tuple[HutchPaths, Path]) -> None:
    paths, docker = env
    docker_config(
        docker, {"auths": {"reg.io": {"auth": b64("docker:dpw")}, "other.io": {"auth": b64("o:p")}}}
    )
    hutch_config(paths, '[registries."reg.io"]\nusername = "hutch"\npassword = "hpw"\n'
                        '[registries."other.io"]\ninsecure = true\n')  # fmt: skip
    s = RegistrySettings.load(paths)
    reg = s.for_registry("reg.io")
    assert (reg.username, reg.password) == ("hutch", "hpw")
    other = s.for_registry("other.io")  # transport from hutch, credentials from Docker
    assert (other.insecure, other.username, other.password) == (True, "o", "p")


def test_docker_config_env_and_explicit_folder(
    env: tuple[HutchPaths, Path], tmp_path: Path
) -> None:
    paths, docker = env
    docker_config(docker, {"auths": {"a.io": {"auth": b64("a:1")}}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    docker_config(elsewhere, {"auths": {"a.io": {"auth": b64("b:2")}}})
    assert RegistrySettings.load(paths).for_registry("a.io").username == "a"
    s = RegistrySettings.load(paths, docker_config_dir=elsewhere)
    assert s.for_registry("a.io").username == "b"
    assert s.docker_config_file == elsewhere / "config.json"


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ("{not json", "is not valid JSON"),
        ("[]", "is not a JSON object"),
        ('{"auths": []}', "'auths' must be an object"),
        ('{"auths": {"a.io": "x"}}', 'auths."a.io" must be an object'),
        ('{"auths": {"a.io": {"auth": "!!!"}}}', 'auths."a.io".auth is not base64'),
        (json.dumps({"auths": {"a.io": {"auth": b64("nocolon")}}}), 'auths."a.io".auth does not'),
        ('{"auths": {"a.io": {"username": 1, "password": "p"}}}', 'auths."a.io".username'),
        ('{"credHelpers": {"a.io": 1}}', "'credHelpers'"),
    ],
)
def test_invalid_docker_config_names_file_and_key(
    env: tuple[HutchPaths, Path], doc: str, fragment: str
) -> None:
    paths, docker = env
    (docker / "config.json").write_text(doc)
    with pytest.raises(ConfigError) as e:
        RegistrySettings.load(paths)
    assert str(docker / "config.json") in e.value.message and fragment in e.value.message


def fake_helper(folder: Path, name: str, script: str) -> None:
    folder.mkdir(exist_ok=True)
    exe = folder / f"docker-credential-{name}"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)


def test_credential_helpers(env: tuple[HutchPaths, Path], tmp_path: Path) -> None:
    paths, docker = env
    log = tmp_path / "helper.log"
    fake_helper(
        tmp_path / "bin",
        "fake",
        f"""read server
echo "$server" >> {log}
case "$server" in
  https://index.docker.io/v1/) echo '{{"ServerURL":"x","Username":"hubuser","Secret":"hubpw"}}' ;;
  tok.io) echo '{{"ServerURL":"tok.io","Username":"<token>","Secret":"idtok"}}' ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
""",
    )
    docker_config(
        docker,
        {
            "auths": {"static.io": {"auth": b64("s:p")}},
            "credsStore": "fake",
            "credHelpers": {"missing.io": "not-installed"},
        },
    )
    s = RegistrySettings.load(paths)
    hub = s.for_registry("docker.io")
    assert (hub.username, hub.password) == ("hubuser", "hubpw")
    assert s.for_registry("tok.io").identity_token == "idtok"
    assert not s.for_registry("none.io").has_credentials  # helper says "not found"
    assert not s.for_registry("missing.io").has_credentials  # helper not installed: ignored
    assert s.for_registry("static.io").username == "s"  # auths entries need no helper
    s.for_registry("docker.io")  # answered from the cache
    assert log.read_text().split() == ["https://index.docker.io/v1/", "tok.io", "none.io"]
