"""Targets, cache image documents, Docker credentials and auth challenges (no registry)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from refcache.storage import (
    ANNOTATION_UNCOMPRESSED,
    Descriptor,
    InvalidError,
    NotFoundError,
    OciLayout,
    UnavailableError,
    format_rfc3339_ns,
    load_credentials,
)
from refcache.storage._oci import (
    LayerMeta,
    build_config,
    build_index,
    build_manifest,
    parse_image,
    parse_manifest,
    parse_rfc3339,
    parse_target,
    validate_name,
)
from refcache.storage._registry import _parse_challenge


@pytest.mark.parametrize(
    ("text", "host", "repo", "tag"),
    [
        ("registry://localhost:5000/team/cache:v1", "localhost:5000", "team/cache", "v1"),
        ("registry://reg.example.com/a/b/c:latest", "reg.example.com", "a/b/c", "latest"),
        ("registry://127.0.0.1/x_y.z-w:t-1.0_a", "127.0.0.1", "x_y.z-w", "t-1.0_a"),
        ("registry://[::1]:5000/r:t", "[::1]:5000", "r", "t"),
    ],
)
def test_registry_targets(text: str, host: str, repo: str, tag: str) -> None:
    t = parse_target(text)
    assert (t.scheme, t.host, t.repository, t.tag, t.digest) == ("registry", host, repo, tag, "")
    assert str(t) == text


def test_layout_targets(tmp_path: Path) -> None:
    assert parse_target(f"oci-layout://{tmp_path}/l").tag == "latest"
    t = parse_target(f"oci-layout://{tmp_path}/l:v2")
    assert (t.path, t.tag) == (tmp_path / "l", "v2")
    assert parse_target("oci-layout://rel/dir:x").path == Path("rel/dir")
    assert parse_target("oci-layout://a:b/dir").path == Path("a:b/dir")  # ':' in a folder


def test_pull_by_digest() -> None:
    digest = "sha256:" + "a" * 64
    t = parse_target(f"registry://h:1/r@{digest}", allow_digest=True)
    assert (t.digest, t.reference) == (digest, digest)
    with pytest.raises(InvalidError, match="needs a tag"):
        parse_target(f"registry://h:1/r@{digest}")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "localhost:5000/r:t",  # no scheme
        "docker://h/r:t",
        "registry://h/r",  # no tag
        "registry://h/",
        "registry://h:99999/r:t",
        "registry://h/UPPER:t",
        "registry://h/r:bad tag",
        "registry://h/r:" + "t" * 200,
        "registry://h_x/r:t",
        "registry://h/r@sha256:short",
        "oci-layout://",
        "oci-layout://dir:bad tag",
    ],
)
def test_bad_targets_name_the_value(text: str) -> None:
    with pytest.raises(InvalidError) as err:
        parse_target(text, allow_digest=True)
    assert repr(text) in str(err.value)


def test_names() -> None:
    assert validate_name("app/v1.2@linux") == "app/v1.2@linux"
    for bad in ("", "-x", "a b", "x" * 300, None):
        with pytest.raises(InvalidError):
            validate_name(bad)


def _layer(n: int) -> Descriptor:
    return Descriptor(
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "sha256:" + f"{n:x}" * 64 if n < 16 else "sha256:" + "b" * 64,
        100 + n,
        {ANNOTATION_UNCOMPRESSED: "sha256:" + f"{n + 1:x}" * 64},
    )


def test_documents_round_trip_and_are_deterministic() -> None:
    layers = [_layer(1), _layer(2)]
    metas = [LayerMeta("base", "", 1_700_000_000_123_456_789), LayerMeta("app", "exec", 0)]
    top = metas[-1]
    config, config_bytes = build_config(layers, metas, top)
    assert build_config(layers, metas, top) == (config, config_bytes)
    doc = json.loads(config_bytes)
    assert doc["rootfs"]["diff_ids"] == [d.annotations[ANNOTATION_UNCOMPRESSED] for d in layers]
    assert doc["config"]["Labels"] == {
        "refcache.description": "app",
        "refcache.record-type": "exec",
    }
    assert doc["history"][0] == {
        "created": "2023-11-14T22:13:20.123456789Z",
        "created_by": "base",
        "comment": "refcache layer record",
    }
    manifest, data = build_manifest("app", config, layers, metas, top)
    parsed = parse_manifest(data, "m")
    assert parsed.config == config
    assert [d.digest for d in parsed.layers] == [d.digest for d in layers]
    assert parsed.metas[0] == LayerMeta("base", "", 1_700_000_000_123_456_789)
    assert parsed.metas[1] == LayerMeta("app", "exec", 0)
    _, index_bytes = build_index({"b": manifest, "a": manifest})
    entries = parse_image("", index_bytes, "idx", "tag")
    assert [e.name for e in entries] == ["a", "b"]
    assert entries[0].desc.digest == manifest.digest
    # A plain image manifest is one entry named after the tag.
    assert [e.name for e in parse_image("", data, "m", "v1")] == ["v1"]


def test_foreign_indexes_are_refused() -> None:
    platform_index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": "sha256:" + "c" * 64,
                    "size": 10,
                    "platform": {"os": "linux", "architecture": "amd64"},
                }
            ],
        }
    ).encode()
    with pytest.raises(InvalidError, match="not a refcache cache image"):
        parse_image("", platform_index, "idx", "t")
    with pytest.raises(InvalidError, match="not valid JSON"):
        parse_image("", b"{", "idx", "t")


def test_rfc3339() -> None:
    assert parse_rfc3339("2023-11-14T22:13:20Z") == 1_700_000_000 * 10**9
    assert parse_rfc3339("2023-11-14T22:13:20.5+00:00") == 1_700_000_000 * 10**9 + 5 * 10**8
    assert parse_rfc3339("yesterday") == 0


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (1_700_000_000 * 10**9, "2023-11-14T22:13:20Z"),
        (1_700_000_000 * 10**9 + 5 * 10**8, "2023-11-14T22:13:20.5Z"),
        (1_700_000_000 * 10**9 + 1, "2023-11-14T22:13:20.000000001Z"),
    ],
)
def test_creation_times_format_like_go_and_parse_back(ns: int, text: str) -> None:
    # Go's time.MarshalText: the fraction keeps nanoseconds with trailing zeros trimmed.
    assert format_rfc3339_ns(ns) == text
    assert parse_rfc3339(text) == ns


def test_docker_config_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    auth = base64.b64encode(b"me:pw:with:colons").decode()
    doc = {
        "auths": {
            "https://reg.example.com/v1/": {"auth": auth},
            "other:5000": {"username": "u", "password": "p"},
            "tok.example.com": {"identitytoken": "refresh-me"},
        }
    }
    (tmp_path / "config.json").write_text(json.dumps(doc))
    creds = load_credentials("reg.example.com", config_dir=tmp_path)
    assert creds is not None
    assert (creds.username, creds.password) == ("me", "pw:with:colons")
    assert "pw" not in repr(creds)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    other = load_credentials("other:5000")
    assert other is not None
    assert (other.username, other.password) == ("u", "p")
    token = load_credentials("tok.example.com")
    assert token is not None
    assert token.identity_token == "refresh-me"
    assert load_credentials("unknown:1") is None
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidError, match=r"config\.json"):
        load_credentials("x")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "missing"))
    assert load_credentials("reg.example.com") is None


def test_challenges() -> None:
    scheme, params = _parse_challenge(
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:a/b:pull,push"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example.com/token",
        "service": "registry.example.com",
        "scope": "repository:a/b:pull,push",
    }
    assert _parse_challenge('Basic realm="Registry Realm"') == (
        "basic",
        {"realm": "Registry Realm"},
    )


def test_credential_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    helper = tmp_path / "bin" / "docker-credential-fake"
    helper.parent.mkdir()
    helper.write_text(
        "#!/bin/sh\n"
        "read host\n"
        'if [ "$host" = "helped.example.com" ]; then\n'
        '  echo \'{"Username": "robot", "Secret": "from-helper"}\'\n'
        'elif [ "$host" = "token.example.com" ]; then\n'
        '  echo \'{"Username": "<token>", "Secret": "refresh"}\'\n'
        "else\n"
        '  echo "credentials not found in native keychain"; exit 1\n'
        "fi\n"
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}:/usr/bin:/bin")
    doc = {"credsStore": "fake", "credHelpers": {"token.example.com": "fake"}}
    (tmp_path / "config.json").write_text(json.dumps(doc))
    creds = load_credentials("helped.example.com", config_dir=tmp_path)
    assert creds is not None
    assert (creds.username, creds.password, creds.source) == (
        "robot",
        "from-helper",
        "docker-credential-fake",
    )
    token = load_credentials("token.example.com", config_dir=tmp_path)
    assert token is not None
    assert token.identity_token == "refresh"
    assert load_credentials("other.example.com", config_dir=tmp_path) is None


def test_a_layout_names_what_is_missing_and_what_it_cannot_read(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path)
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (tmp_path / "blobs" / "sha256").mkdir(parents=True)
    missing = "sha256:" + "ab" * 32
    with pytest.raises(NotFoundError, match=f"blob {missing}: not found in"):
        layout.open_blob(Descriptor(ANNOTATION_UNCOMPRESSED, missing, 1))
    with pytest.raises(NotFoundError, match=f"manifest {missing}: not found in"):
        layout.get_manifest(missing)
    # A blob path that cannot be read (here a directory) is the layout being unavailable.
    unreadable = "sha256:" + "cd" * 32
    (tmp_path / "blobs" / "sha256" / ("cd" * 32)).mkdir()
    with pytest.raises(UnavailableError, match=f"fetch of blob {unreadable}"):
        layout.open_blob(Descriptor(ANNOTATION_UNCOMPRESSED, unreadable, 1))
    with pytest.raises(UnavailableError, match=f"read of manifest {unreadable}"):
        layout.get_manifest(unreadable)
