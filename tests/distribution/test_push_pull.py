"""Push and pull through a real registry (Debian's docker-registry) and an OCI layout."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from refcache.actors import (
    AuthError,
    Cache,
    FailedPreconditionError,
    InvalidError,
    NeedsRemoteProviderError,
    NotFoundError,
    ProgressEvent,
    UnavailableError,
    open_cache,
)

pytestmark = pytest.mark.integration

WAIT = 60.0


def _open(root: Path, timeout: float = WAIT) -> Cache:
    return open_cache(root, snapshotter="native", timeout=timeout)


def _files(ref: Any, helpers: Any) -> dict[str, str]:
    with ref.mount().local() as path:
        return helpers.tree_digest(path)


_BUILDER = textwrap.dedent(
    """
    import json, random, sys
    from pathlib import Path
    from refcache import open_cache

    root, target, expected = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

    def write(path, seed):
        rng = random.Random(seed)
        (path / seed).mkdir(parents=True)
        for i in range(5):
            (path / seed / f"f{i}.bin").write_bytes(rng.randbytes(rng.randint(1000, 60000)))
        (path / seed / "link").symlink_to("f0.bin")
        (path / seed / "x.sh").write_text("#!/bin/sh\\n")
        (path / seed / "x.sh").chmod(0o750)

    with open_cache(root, snapshotter="native", timeout=60) as cache:
        refs = {}
        ref = None
        for name, seeds in (("base", ["os", "libs"]), ("app", ["app"])):
            for seed in seeds:
                m = cache.manager.new(ref, description=f"step {seed}").get()
                with m.mount().local() as p:
                    write(p, seed)
                write(expected / name, seed) if name == "base" else None
                nxt = m.commit()
                nxt.metadata.record_type = "exec"
                if ref is not None:
                    ref.release()
                ref = nxt
            refs[name] = ref.clone()
        for seed in ("os", "libs", "app"):
            write(expected / "app", seed)
        result = cache.push(target, refs, compression="gzip", insecure=True)
        print(json.dumps({"index": result.index_digest, "uploaded": result.blobs_uploaded,
                          "ids": {k: v.id for k, v in refs.items()}}))
        for r in refs.values():
            r.release()
        ref.release()
    """
)


def test_round_trip_between_two_processes(registry: Any, helpers: Any, tmp_path: Path) -> None:
    target = f"registry://{registry.host}/team/cache:round-trip"
    expected = tmp_path / "expected"
    done = subprocess.run(
        [sys.executable, "-c", _BUILDER, str(tmp_path / "cache-a"), target, str(expected)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    pushed = json.loads(done.stdout.strip().splitlines()[-1])
    assert pushed["uploaded"] == 5  # 3 layers + 2 configs

    with _open(tmp_path / "cache-b") as cache:
        refs = cache.pull(target, insecure=True)
        try:
            assert sorted(refs) == ["app", "base"]
            app = refs["app"]
            info = app.info()
            assert info.blob_only
            assert info.description == "step app"
            assert info.record_type == "exec"
            chain = app.layer_chain()
            assert [r.info().description for r in chain] == ["step os", "step libs", "step app"]
            chain.release()
            for name in ("base", "app"):
                assert _files(refs[name], helpers) == helpers.tree_digest(expected / name)
            # The base record is the app's parent: one chain, no copies.
            assert refs["app"].info().parents[0] == refs["base"].id
        finally:
            for r in refs.values():
                r.release()


def test_lazy_pull_fetches_only_the_layers_that_are_mounted(
    cache: Cache, registry: Any, proxy: Any, helpers: Any, tmp_path: Path
) -> None:
    base = helpers.build_chain(cache, ["base0", "base1"])
    a = helpers.build_chain(cache, ["a"], base)
    b = helpers.build_chain(cache, ["b"], base)
    target = f"registry://{proxy.host}/lazy/cache:v1"
    cache.push(target, {"a": a, "b": b}, insecure=True)
    with _open(tmp_path / "other") as other:
        before = len(proxy.requests)
        refs = other.pull(target, insecure=True)
        pulled = proxy.requests[before:]
        assert proxy.blob_gets() == []  # manifests only
        assert all("/manifests/" in p for _m, p, _s, _r in pulled)
        assert len(pulled) == 3  # index + two manifests (no config: the diffIDs are inline)
        try:
            with refs["a"].mount().local() as path:
                assert sorted(p.name for p in path.iterdir()) == ["a", "base0", "base1"]
            fetched = set(proxy.blob_gets())
            a_layers = {d.digest for d in a.get_remotes("zstd")[0].descriptors}
            b_top = b.get_remotes("zstd")[0].descriptors[-1].digest
            assert fetched == a_layers
            assert b_top not in fetched
            stats = other.manager.statistics().get(timeout=WAIT)
            assert stats.registry_blobs[("pull", "fetched")] == 3
            assert stats.lazy == 1  # b's own layer
        finally:
            for r in refs.values():
                r.release()
    for r in (base, a, b):
        r.release()


def test_pulling_twice_or_shared_layers_makes_no_duplicate_records(
    cache: Cache, registry: Any, helpers: Any, tmp_path: Path
) -> None:
    base = helpers.build_chain(cache, ["s0", "s1"])
    app = helpers.build_chain(cache, ["s2"], base)
    target = f"registry://{registry.host}/dedup/cache:v1"
    cache.push(target, {"app": app, "base": base}, insecure=True)
    # Pulling back into the cache that pushed finds its own records by blob-chain ID.
    refs = cache.pull(target, insecure=True)
    assert refs["app"].id == app.id
    assert refs["base"].id == base.id
    records = cache.manager.statistics().get(timeout=WAIT).records
    assert records == 3
    with _open(tmp_path / "other") as other:
        first = other.pull(target, insecure=True)
        second = other.pull(target, insecure=True)
        assert {k: v.id for k, v in first.items()} == {k: v.id for k, v in second.items()}
        assert other.manager.statistics().get(timeout=WAIT).records == 3
        for r in [*first.values(), *second.values()]:
            r.release()
    for r in [*refs.values(), base, app]:
        r.release()


def test_second_push_uploads_nothing_for_shared_blobs(
    cache: Cache, registry: Any, proxy: Any, helpers: Any
) -> None:
    base = helpers.build_chain(cache, ["shared0", "shared1"])
    one = helpers.build_chain(cache, ["one"], base)
    two = helpers.build_chain(cache, ["two"], base)
    first = cache.push(f"registry://{proxy.host}/fleet/app:one", {"app": one}, insecure=True)
    assert first.blobs_uploaded == 4  # 3 layers + config
    assert first.blobs_skipped == 0
    before = len(proxy.uploads())
    second = cache.push(f"registry://{proxy.host}/fleet/app:two", {"app": two}, insecure=True)
    base_layers = {d.digest for d in base.get_remotes("zstd")[0].descriptors}
    uploaded = set(proxy.uploads()[before:])
    assert not uploaded & base_layers
    assert second.blobs_skipped == 2
    assert second.bytes_skipped == sum(d.size for d in base.get_remotes("zstd")[0].descriptors)
    assert second.blobs_uploaded == 2  # its own layer and its config
    # The same again: everything is there.
    again = cache.push(f"registry://{proxy.host}/fleet/app:two", {"app": two}, insecure=True)
    assert again.blobs_uploaded == 0
    assert again.index_digest == second.index_digest
    # Another repository of the same registry: the blobs are mounted, not sent.
    other = cache.push(f"registry://{proxy.host}/elsewhere/app:two", {"app": two}, insecure=True)
    assert other.blobs_mounted == 3  # the layers
    assert other.blobs_uploaded == 1  # the config (small; never stored locally)
    assert any("mount=" in p for m, p, s, _ in proxy.requests if m == "POST" and s == 201)
    for r in (base, one, two):
        r.release()


def test_broken_connection_resumes_with_a_range_request(
    cache: Cache, registry: Any, proxy: Any, helpers: Any, tmp_path: Path
) -> None:
    ref = helpers.build_chain(cache, ["big"])
    layer = ref.get_remotes("uncompressed")[0].descriptors[0]
    target = f"registry://{proxy.host}/resume/cache:v1"
    cache.push(target, {"big": ref}, compression="uncompressed", insecure=True)
    assert layer.size > 50_000
    proxy.cut(layer.digest, after=30_000, times=2)
    with _open(tmp_path / "other") as other:
        refs = other.pull(target, insecure=True)
        with refs["big"].mount().local() as path:
            assert helpers.tree_digest(path) == _files(ref, helpers)
        ranges = [r for m, p, _s, r in proxy.requests if m == "GET" and layer.digest in p]
        assert ranges[0] == ""
        assert ranges[1].startswith("bytes=")
        assert ranges[1] != "bytes=0-"
        assert len(ranges) == 3
        assert other.content.list_statuses() == []
        refs["big"].release()
    ref.release()


def test_registry_stopped_mid_push_fails_clearly_and_a_retry_succeeds(
    registry: Any, helpers: Any, tmp_path: Path
) -> None:
    with _open(tmp_path / "a", timeout=3) as cache:
        ref = helpers.build_chain(cache, ["p0", "p1", "p2"])
        before = cache.manager.disk_usage().get(timeout=WAIT)
        target = f"registry://{registry.host}/stop/push:v1"
        stopped = threading.Event()

        def stop_after_first(event: ProgressEvent) -> None:
            if event.kind == "blob-done" and not stopped.is_set():
                stopped.set()
                registry.stop()

        with pytest.raises(UnavailableError) as err:
            cache.push(target, {"x": ref}, insecure=True, progress=stop_after_first)
        assert registry.host in str(err.value)
        after = cache.manager.disk_usage().get(timeout=WAIT)
        assert sorted(r.id for r in after) == sorted(r.id for r in before)
        registry.start()
        result = cache.push(target, {"x": ref}, insecure=True)
        assert result.blobs_uploaded + result.blobs_skipped == 4
        expected = _files(ref, helpers)
        ref.release()
    with _open(tmp_path / "b") as other:
        refs = other.pull(target, insecure=True)
        assert _files(refs["x"], helpers) == expected
        refs["x"].release()


def test_a_blob_link_the_registry_cannot_read_is_uploaded_again(
    cache: Cache, registry: Any, helpers: Any
) -> None:
    # A registry killed while it wrote a blob's link leaves it empty: distribution then
    # answers every HEAD of that blob with HTTP 500 ("invalid checksum digest format"). A
    # push takes that as "not there" and uploads the blob, which rewrites the link.
    ref = helpers.build_chain(cache, ["link0"])
    target = f"registry://{registry.host}/broken/link:v1"
    cache.push(target, {"x": ref}, insecure=True)
    links = sorted((registry.storage / "docker/registry/v2/repositories/broken/link").rglob("link"))
    layer_links = [p for p in links if "_layers" in p.parts]
    assert layer_links
    for link in layer_links:
        link.write_text("")
    result = cache.push(target, {"x": ref}, insecure=True)
    assert result.blobs_uploaded == len(layer_links)
    assert all(link.read_text().startswith("sha256:") for link in layer_links)
    ref.release()


def test_registry_stopped_mid_fetching_pull_leaves_no_record(
    cache: Cache, registry: Any, helpers: Any, tmp_path: Path
) -> None:
    ref = helpers.build_chain(cache, ["q0", "q1", "q2", "q3"])
    target = f"registry://{registry.host}/stop/pull:v1"
    cache.push(target, {"x": ref}, insecure=True)
    expected = _files(ref, helpers)
    ref.release()
    with _open(tmp_path / "other", timeout=3) as other:
        stopped = threading.Event()

        def stop_after_first(event: ProgressEvent) -> None:
            if event.kind == "blob-done" and not stopped.is_set():
                stopped.set()
                registry.stop()

        with pytest.raises(UnavailableError) as err:
            other.pull(target, insecure=True, fetch=True, progress=stop_after_first)
        assert registry.host in str(err.value)
        assert other.manager.statistics().get(timeout=WAIT).records == 0
        assert other.content.list_statuses() == []
        assert other.leases.list() == []
        registry.start()
        refs = other.pull(target, insecure=True, fetch=True)
        info = refs["x"].info()
        assert info.blob_only
        assert other.content.exists(info.blob)
        assert _files(refs["x"], helpers) == expected
        refs["x"].release()


def test_unreachable_source_at_extract_names_registry_and_digest(
    cache: Cache, registry: Any, helpers: Any, tmp_path: Path
) -> None:
    ref = helpers.build_chain(cache, ["u0"])
    target = f"registry://{registry.host}/down/cache:v1"
    cache.push(target, {"x": ref}, insecure=True)
    expected = _files(ref, helpers)
    ref.release()
    with _open(tmp_path / "other", timeout=3) as other:
        refs = other.pull(target, insecure=True)
        blob = refs["x"].info().blob
        registry.stop()
        with pytest.raises(UnavailableError) as err:
            refs["x"].extract()
        assert registry.host in str(err.value)
        assert blob in str(err.value)
        assert not isinstance(err.value, NeedsRemoteProviderError)
        assert refs["x"].info().blob_only
        assert not other.content.exists(blob)
        assert other.content.list_statuses() == []
        registry.start()
        assert _files(refs["x"], helpers) == expected
        refs["x"].release()


def test_corrupted_blob_is_rejected_and_nothing_is_stored(
    cache: Cache, registry: Any, helpers: Any, tmp_path: Path
) -> None:
    ref = helpers.build_chain(cache, ["c0"])
    target = f"registry://{registry.host}/corrupt/cache:v1"
    cache.push(target, {"x": ref}, compression="gzip", insecure=True)
    blob = ref.get_remotes("gzip")[0].descriptors[0].digest
    ref.release()
    data = registry.blob_data(blob)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different bytes
    data.write_bytes(bytes(raw))
    with _open(tmp_path / "other") as other:
        refs = other.pull(target, insecure=True)
        with pytest.raises(FailedPreconditionError) as err:
            refs["x"].extract()
        assert blob in str(err.value)
        assert not other.content.exists(blob)
        assert other.content.list_statuses() == []
        assert refs["x"].info().blob_only
        refs["x"].release()


def test_wrong_or_missing_credentials_name_the_registry(
    secure_registry: Any, helpers: Any, tmp_path: Path
) -> None:
    host = secure_registry.host
    target = f"registry://{host}/private/cache:v1"
    ca = secure_registry.tls.ca
    empty = tmp_path / "no-docker-config"
    with _open(tmp_path / "a", timeout=5) as cache:
        ref = helpers.build_chain(cache, ["w0"])
        with pytest.raises(AuthError) as err:
            cache.push(target, {"x": ref}, credentials=("builder", "wrong"), ca_file=ca)
        assert host in str(err.value)
        assert "builder" in str(err.value)
        with pytest.raises(AuthError) as err:
            cache.push(target, {"x": ref}, ca_file=ca, docker_config=empty)
        assert host in str(err.value)
        assert "credentials" in str(err.value)
        # Without the test CA the certificate is not trusted: a clear error, no retries.
        with pytest.raises(UnavailableError) as err:
            cache.push(target, {"x": ref}, credentials=("builder", "s3cret"))
        assert "TLS" in str(err.value)
        assert host in str(err.value)
        # Credentials the way docker login stores them.
        config = helpers.docker_config(tmp_path / "docker", host, "builder", "s3cret")
        result = cache.push(target, {"x": ref}, ca_file=ca, docker_config=config)
        assert result.blobs_uploaded == 2
        expected = _files(ref, helpers)
        ref.release()
    with _open(tmp_path / "b") as other:
        with pytest.raises(AuthError):
            other.pull(target, ca_file=ca, credentials=("builder", "nope"))
        assert other.manager.statistics().get(timeout=WAIT).records == 0
        refs = other.pull(target, ca_file=ca, credentials=("builder", "s3cret"))
        assert _files(refs["x"], helpers) == expected
        refs["x"].release()


def test_oci_layout_round_trip(cache: Cache, helpers: Any, tmp_path: Path) -> None:
    base = helpers.build_chain(cache, ["l0", "l1"])
    app = helpers.build_chain(cache, ["l2"], base)
    layout = tmp_path / "layout"
    first = cache.push(f"oci-layout://{layout}:v1", {"app": app, "base": base})
    again = cache.push(f"oci-layout://{layout}", {"base": base})
    assert again.blobs_skipped == 3  # two layers and the config
    index = json.loads((layout / "index.json").read_text())
    tags = {
        m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
        for m in index["manifests"]
    }
    assert tags == {"v1": first.index_digest, "latest": again.index_digest}
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    expected = {name: _files(r, helpers) for name, r in (("app", app), ("base", base))}
    with _open(tmp_path / "other") as other:
        refs = other.pull(f"oci-layout://{layout}:v1")
        assert {k: _files(v, helpers) for k, v in refs.items()} == expected
        with pytest.raises(NotFoundError):
            other.pull(f"oci-layout://{layout}:nope")
        for r in refs.values():
            r.release()
    base.release()
    app.release()


def test_lazy_records_go_at_restart_and_a_repull_reads_manifests_only(
    cache: Cache, registry: Any, proxy: Any, helpers: Any, tmp_path: Path
) -> None:
    base = helpers.build_chain(cache, ["r0"])
    app = helpers.build_chain(cache, ["r1"], base)
    target = f"registry://{proxy.host}/restart/cache:v1"
    cache.push(target, {"app": app, "base": base}, insecure=True)
    root = tmp_path / "other"
    with _open(root) as other:
        refs = other.pull(target, insecure=True)
        refs["base"].extract()  # fetched and unpacked: survives the restart
        base_id, app_id = refs["base"].id, refs["app"].id
        for r in refs.values():
            r.release()
    with _open(root) as other:
        ids = {u.id for u in other.manager.disk_usage().get(timeout=WAIT)}
        assert ids == {base_id}  # the lazy one went (no handler at open)
        with pytest.raises(NotFoundError):
            other.manager.get(app_id).get(timeout=WAIT)
        before = len(proxy.requests)
        refs = other.pull(target, insecure=True)
        assert all("/manifests/" in p for _m, p, _s, _r in proxy.requests[before:])
        assert refs["base"].id == base_id  # found again by blob-chain ID
        assert not refs["base"].info().blob_only
        assert refs["app"].info().blob_only
        # After a release, get() of a pulled lazy record still finds its source.
        app_id = refs["app"].id
        refs["app"].release()
        again = other.manager.get(app_id).get(timeout=WAIT)
        assert _files(again, helpers) == _files(app, helpers)
        again.release()
        refs["base"].release()
    base.release()
    app.release()


def test_metrics_count_pushed_and_pulled_blobs_and_requests(
    cache: Cache, registry: Any, helpers: Any, tmp_path: Path
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from refcache.metrics import CacheCollector

    ref = helpers.build_chain(cache, ["m0", "m1"])
    target = f"registry://{registry.host}/metrics/cache:v1"
    result = cache.push(target, {"x": ref}, insecure=True)
    stats = cache.manager.statistics().get(timeout=WAIT)
    assert stats.registry_blobs[("push", "uploaded")] == 3
    assert stats.registry_bytes["push"] == result.bytes_uploaded
    assert stats.registry_requests[("blob_head", "404")] == 3
    assert stats.operations[("push", "ok")] == 1
    registry_ = CollectorRegistry()
    CacheCollector(cache.manager, registry=registry_)
    text = generate_latest(registry_).decode()
    assert (
        f'refcache_registry_bytes_total{{direction="push"}} {float(result.bytes_uploaded)}' in text
    )
    assert 'refcache_registry_blobs_total{direction="push",result="uploaded"} 3.0' in text
    assert (
        'refcache_registry_request_duration_seconds_count{operation="blob_upload",status="201"} 3.0'
        in text
    )
    with _open(tmp_path / "other") as other:
        refs = other.pull(target, insecure=True, extract=True)
        s = other.manager.statistics().get(timeout=WAIT)
        assert s.registry_blobs[("pull", "fetched")] == 2
        assert s.registry_bytes["pull"] == sum(
            d.size for d in ref.get_remotes("zstd")[0].descriptors
        )
        refs["x"].release()
    ref.release()


def test_bad_arguments_change_nothing(cache: Cache, helpers: Any, tmp_path: Path) -> None:
    ref = helpers.build_chain(cache, ["bad"])
    for target in ("registry://h/repo", "ftp://x/y:z", "registry://h:0/r:t", "oci-layout://"):
        with pytest.raises(InvalidError) as err:
            cache.push(target, {"x": ref})
        assert repr(target) in str(err.value)
    with pytest.raises(InvalidError):
        cache.push(f"oci-layout://{tmp_path}/l", {"bad name!": ref})
    with pytest.raises(InvalidError):
        cache.push(f"oci-layout://{tmp_path}/l", {"x": ref}, compression="estargz")
    with pytest.raises(InvalidError):
        cache.push(f"oci-layout://{tmp_path}/l", {})
    with pytest.raises(InvalidError):
        cache.pull("registry://127.0.0.1:1/r")
    assert not (tmp_path / "l").exists()
    with pytest.raises(UnavailableError):
        cache.pull(f"oci-layout://{tmp_path}/missing")
    ref.release()


def test_registry_stopped_while_a_lazy_pull_reads_manifests_leaves_no_record(
    cache: Cache, registry: Any, helpers: Any, tmp_path: Path
) -> None:
    base = helpers.build_chain(cache, ["z0"])
    names = {f"n{i}": helpers.build_chain(cache, [f"z{i + 1}"], base) for i in range(24)}
    target = f"registry://{registry.host}/stop/lazy:v1"
    cache.push(target, names, insecure=True)
    with _open(tmp_path / "other", timeout=3) as other:
        stopped = threading.Event()

        def stop_at_first_manifest(event: ProgressEvent) -> None:
            if event.kind == "manifest" and not stopped.is_set():
                stopped.set()
                registry.stop()

        with pytest.raises(UnavailableError) as err:
            other.pull(target, insecure=True, progress=stop_at_first_manifest)
        assert registry.host in str(err.value)
        assert other.manager.statistics().get(timeout=WAIT).records == 0
        registry.start()
        refs = other.pull(target, insecure=True)
        assert sorted(refs) == sorted(names)
        assert other.manager.statistics().get(timeout=WAIT).records == 25
        for r in refs.values():
            r.release()
    for r in [base, *names.values()]:
        r.release()


def test_children_of_pulled_lazy_records_extract_through_the_inherited_handlers(
    cache: Cache, registry: Any, helpers: Any, tmp_path: Path
) -> None:
    base = helpers.build_chain(cache, ["k0", "k1"])
    target = f"registry://{registry.host}/inherit/cache:v1"
    cache.push(target, {"base": base}, insecure=True)
    with _open(tmp_path / "other") as other:
        refs = other.pull(target, insecure=True)
        pulled = refs.pop("base")
        assert pulled.info().blob_only
        # new() on a lazy parent extracts it through the handle's handlers (inherited by the
        # child), and a merge of pulled records carries them too.
        child = other.manager.new(pulled, description="child").get(timeout=WAIT)
        with child.mount().local() as path:
            (path / "extra").write_text("x")
            assert sorted(p.name for p in path.iterdir()) == ["extra", "k0", "k1"]
        committed = child.commit()
        chain = pulled.layer_chain()
        merged = other.manager.merge(list(chain)).get(timeout=WAIT)
        assert _files(merged, helpers) == _files(base, helpers)
        for r in (merged, committed, pulled):
            r.release()
        chain.release()
    base.release()
