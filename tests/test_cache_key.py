"""Tests of cache/key.py: every field that changes the features changes the key, nothing else does,
and tenants never share a key."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from cache.key import FeatureKey, image_digest

IMAGE = b"\x89PNG\r\n\x1a\n pretend image bytes"


def make_key(**changes: object) -> FeatureKey:
    fields: dict[str, object] = {
        "image_digest": image_digest(IMAGE),
        "encoder_name": "coca-demo-cnn",
        "encoder_weights_digest": "ab" * 32,
        "preprocess": {"size": 128, "mean": [0.5, 0.5, 0.5], "resize_mode": "squash"},
        "reduction": None,
        "tenant_salt": None,
    }
    fields.update(changes)
    return FeatureKey(**fields)  # type: ignore[arg-type]


def test_image_digest_is_sha256_of_the_raw_bytes():
    assert image_digest(IMAGE) == hashlib.sha256(IMAGE).hexdigest()
    assert image_digest(IMAGE) != image_digest(IMAGE + b"\0")


def test_digest_is_stable_lowercase_hex():
    key = make_key()
    assert key.digest() == make_key().digest()
    assert len(key.digest()) == 64 and set(key.digest()) <= set("0123456789abcdef")


def test_dict_key_order_does_not_matter():
    a = make_key(preprocess={"size": 128, "mean": [0.5], "nested": {"x": 1, "y": 2}})
    b = make_key(preprocess={"nested": {"y": 2, "x": 1}, "mean": [0.5], "size": 128})
    assert a.digest() == b.digest() and a == b and hash(a) == hash(b)


@pytest.mark.parametrize(
    "change",
    [
        {"image_digest": image_digest(b"another image")},
        {"encoder_name": "ViT-B-32"},
        {"encoder_weights_digest": "cd" * 32},
        {"preprocess": {"size": 224, "mean": [0.5, 0.5, 0.5], "resize_mode": "squash"}},
        {"preprocess": {"size": 128, "mean": [0.5, 0.5, 0.5], "resize_mode": "shortest"}},
        {"reduction": {"method": "pool", "tokens": 16}},
        {"reduction": {}},  # an explicit empty reduction is not "no reduction"
        {"tenant_salt": "tenant-a"},
    ],
)
def test_every_field_changes_the_key(change: dict):
    assert make_key(**change).digest() != make_key().digest()


def test_tenants_with_the_same_image_get_different_keys():
    a, b = make_key(tenant_salt="tenant-a"), make_key(tenant_salt="tenant-b")
    assert len({a.digest(), b.digest(), make_key().digest()}) == 3
    assert a != b


def test_fields_cannot_run_into_each_other():
    # With plain concatenation these two would hash the same bytes.
    a = make_key(encoder_name="enc", encoder_weights_digest="ab12")
    b = make_key(encoder_name="enca", encoder_weights_digest="b12")
    assert a.digest() != b.digest()


def test_mutating_the_callers_dict_afterwards_does_not_change_the_key():
    preprocess = {"size": 128, "mean": [0.5]}
    key = make_key(preprocess=preprocess)
    before = key.digest()
    preprocess["size"] = 224
    preprocess["mean"].append(0.1)
    assert key.digest() == before == make_key(preprocess={"size": 128, "mean": [0.5]}).digest()


def test_salt_is_not_in_the_repr():
    assert "s3cret" not in repr(make_key(tenant_salt="s3cret"))


def test_replace_recomputes_the_digest():
    key = make_key()
    assert dataclasses.replace(key, encoder_name="other").digest() != key.digest()


def test_keys_are_hashable_and_frozen():
    key = make_key()
    assert len({key, make_key(), make_key(tenant_salt="t")}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.encoder_name = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"image_digest": "not hex!"}, ValueError),
        ({"image_digest": "ABCDEF"}, ValueError),  # uppercase would give a second key for one image
        ({"image_digest": ""}, ValueError),
        ({"encoder_name": ""}, ValueError),
        ({"encoder_weights_digest": ""}, ValueError),
        ({"preprocess": [("size", 128)]}, TypeError),
        ({"preprocess": {"size": float("nan")}}, ValueError),
        ({"preprocess": {"size": object()}}, TypeError),
        ({"reduction": "pool"}, TypeError),
        ({"tenant_salt": ""}, ValueError),
    ],
)
def test_bad_fields_are_rejected(change: dict, error: type[Exception]):
    with pytest.raises(error):
        make_key(**change)
