"""The vision stage (vision/stage.py): source -> key -> cache -> batched encode -> reduced tokens, over a
real random-weight CNN tower with an 8x8 token grid (the demo tower's shape, smaller channels)."""

from __future__ import annotations

import base64
import io
import threading

import pytest
import torch
from PIL import Image
from torch import nn

from cache import FeatureKey, image_digest
from vision.encoders.open_clip import VisionEncoder
from vision.intake import CorruptImage, EmptyImage, ImageTooLarge, IntakeLimits, UnsupportedImageFormat
from vision.preprocess import PreprocessCfg
from vision.reduce import ReductionSpec, reduce
from vision.stage import VisionStage, VisionStageConfig, VisualTokensError, parse_visual_tokens
from vision.towers import ConvTower, ConvTowerCfg


@pytest.fixture(scope="module")
def encoder() -> VisionEncoder:
    torch.manual_seed(0)
    tower = ConvTower(ConvTowerCfg(image_size=128, channels=(8, 16, 32, 32), width=32, embed_dim=16))
    return VisionEncoder(tower, PreprocessCfg(128, (0.5,) * 3, (0.5,) * 3), "test-conv", "abc123")


@pytest.fixture
def stage(encoder):
    with VisionStage(encoder, VisionStageConfig(max_wait_ms=20)) as s:
        yield s


def png(seed: int, size: tuple[int, int] = (96, 80)) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png(seed))).save(buf, "JPEG")
    return buf.getvalue()


def encoded(stage: VisionStage) -> int:
    return stage.stats()["encoder_images"]


def test_the_same_bytes_twice_is_a_hot_hit_in_any_source_form(stage, encoder):
    data = png(1)
    first = stage.features(data)
    assert first.source == "computed" and encoded(stage) == 1
    for source in (data, base64.b64encode(data).decode(), "data:image/png;base64," + base64.b64encode(data).decode()):
        again = stage.features(source)
        assert again.source == "hot" and again.key == first.key
        assert torch.equal(again.features.tokens, first.features.tokens)
    assert encoded(stage) == 1 and stage.stats()["hot_hits"] == 3
    assert first.key == FeatureKey(image_digest(data), "test-conv", "abc123", encoder.preprocess_cfg.to_dict(),
                                   {"method": "none"}).digest()


def test_features_equal_the_unbatched_encoder_and_reduce(stage, encoder):
    data = png(2)
    direct = encoder.encode([Image.open(io.BytesIO(data)).convert("RGB")])[0]
    full = stage.features(data)
    torch.testing.assert_close(full.features.tokens, direct.tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full.features.pooled, direct.pooled, rtol=1e-4, atol=1e-5)
    quarter = stage.features(data, visual_tokens=16)
    torch.testing.assert_close(quarter.features.tokens, reduce(direct.tokens, ReductionSpec("tome", 16)),
                               rtol=1e-4, atol=1e-5)


def test_tenant_salts_never_share_an_entry(stage):
    data = png(3)
    a, b, none = (stage.features(data, tenant_salt=t) for t in ("tenant-a", "tenant-b", None))
    assert (a.source, b.source, none.source) == ("computed", "computed", "computed")
    assert len({a.key, b.key, none.key}) == 3 and encoded(stage) == 3
    assert stage.features(data, tenant_salt="tenant-a").source == "hot" and encoded(stage) == 3


def test_sixteen_concurrent_requests_for_one_new_image_run_the_encoder_once(stage):
    data, results = png(4), [None] * 16
    start = threading.Barrier(16)

    def call(i: int) -> None:
        start.wait()
        results[i] = stage.features(data)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert encoded(stage) == 1 and stage.stats()["encoder_forwards"] == 1
    assert len({r.key for r in results}) == 1
    assert all(torch.equal(r.features.tokens, results[0].features.tokens) for r in results)


@pytest.mark.parametrize("method, wants", [("tome", {None: 64, 1.0: 64, 16: 16, 0.5: 32, 0.125: 8, 1000: 64}),
                                           ("keep", {16: 16, 0.5: 32}), ("pool", {0.25: 16, 0.125: 9, 4: 4})])
def test_visual_tokens_changes_the_key_and_the_token_count(encoder, method, wants):
    data = png(5)
    with VisionStage(encoder, VisionStageConfig(reduction_method=method)) as stage:
        results = {v: stage.features(data, visual_tokens=v) for v in wants}
        for v, want in wants.items():
            assert results[v].features.tokens.shape == (want, 32), v
            assert results[v].features.pooled.shape == (16,)
        keys = {v: r.key for v, r in results.items()}
        assert len(set(keys.values())) == len(keys) - (None in keys and 1.0 in keys)
        if None in keys:
            assert keys[None] == keys[1.0]  # "all tokens" is one entry however it is asked for


def test_keep_ranks_by_the_towers_own_attention_pool_query(encoder):
    data = png(6)
    with VisionStage(encoder, VisionStageConfig(reduction_method="keep")) as stage:
        got = stage.features(data, visual_tokens=0.25).features.tokens
        direct = stage.features(data).features.tokens
    expected = reduce(direct, ReductionSpec("keep", 0.25), pooled=encoder.visual.pool_query.detach())
    torch.testing.assert_close(got, expected)


def test_the_configured_default_applies_when_a_request_names_none(encoder):
    with VisionStage(encoder, VisionStageConfig(default_visual_tokens=0.25)) as stage:
        assert stage.features(png(7)).features.tokens.shape == (16, 32)
        assert stage.features(png(7), visual_tokens=1.0).features.tokens.shape == (64, 32)


@pytest.mark.parametrize("value", [0, -3, 0.0, 1.5, True, "16"])
def test_bad_visual_tokens_are_clear_errors_before_any_work(stage, value):
    with pytest.raises(VisualTokensError, match="visual_tokens") as e:
        stage.features(png(8), visual_tokens=value)
    assert e.value.param == "visual_tokens" and encoded(stage) == 0 and stage.stats()["requests"] == 0


def test_parse_visual_tokens_setting():
    assert (parse_visual_tokens(""), parse_visual_tokens("16"), parse_visual_tokens(" 0.25 ")) == (None, 16, 0.25)
    with pytest.raises(VisualTokensError):
        parse_visual_tokens("a quarter")


def bomb_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("source, error", [(b"", EmptyImage), (png(9)[:60], CorruptImage),
                                           (jpeg(9)[:400], CorruptImage), (b"hello world", UnsupportedImageFormat),
                                           (bomb_png(6000, 6000), ImageTooLarge),
                                           ("http://images.test/a.png", UnsupportedImageFormat)])
def test_bad_images_raise_typed_errors_and_nothing_is_cached(encoder, source, error):
    config = VisionStageConfig(intake=IntakeLimits(max_pixels=10_000_000))
    with VisionStage(encoder, config) as stage:
        for _ in range(2):  # the second try fails the same way: no entry was left behind
            with pytest.raises(error):
                stage.features(source)
        stats = stage.stats()
    assert stats["hot_entries"] == 0 and stats["encoder_images"] == 0 and stats["image_errors"] == 2


def test_remote_urls_go_through_the_fetcher_and_are_keyed_by_the_fetched_bytes(encoder):
    data, fetched = png(10), []
    fetch = lambda url: (fetched.append(url), data)[1]  # noqa: E731
    with VisionStage(encoder, VisionStageConfig(), fetch=fetch) as stage:
        remote = stage.features("https://images.test/cat.png")
        assert stage.features(data).source == "hot"
    assert fetched == ["https://images.test/cat.png"] and remote.source == "computed"


def test_a_new_stage_on_the_same_directory_finds_features_on_disk(encoder, tmp_path):
    data = png(11)
    config = VisionStageConfig(disk_dir=str(tmp_path / "features"), disk_bytes=1 << 24)
    with VisionStage(encoder, config) as first:
        computed = first.features(data, visual_tokens=0.5)
    with VisionStage(encoder, config) as second:  # as after a restart: an empty hot tier
        from_disk = second.features(data, visual_tokens=0.5)
        assert from_disk.source == "disk" and second.features(data, visual_tokens=0.5).source == "hot"
        stats = second.stats()
    assert from_disk.key == computed.key and torch.equal(from_disk.features.tokens, computed.features.tokens)
    assert stats["encoder_images"] == 0 and stats["disk_hits"] == 1


def test_stats_name_every_counter_the_issue_asks_for(stage):
    stage.features(png(12))
    stats = stage.stats()
    for name in ("hot_hits", "hot_misses", "disk_hits", "disk_misses", "hot_evictions", "hot_bytes",
                 "encoder_forwards", "encoder_images", "encoder_seconds", "compute_seconds", "requests"):
        assert name in stats, name
    assert stats["encoder_seconds"] > 0 and stats["hot_bytes"] > 0


class GridlessTower(nn.Module):
    output_tokens = True

    def forward(self, images):
        return images.mean((2, 3)), images.flatten(2).transpose(1, 2)[:, :5]


def test_pool_on_a_tower_without_a_grid_is_refused_at_construction():
    encoder = VisionEncoder(GridlessTower(), PreprocessCfg(8, (0.5,) * 3, (0.5,) * 3), "gridless", "00")
    with pytest.raises(ValueError, match="no grid"):
        VisionStage(encoder, VisionStageConfig(reduction_method="pool"))
    with VisionStage(encoder, VisionStageConfig(reduction_method="keep")) as stage:
        assert stage.features(png(13), visual_tokens=2).features.tokens.shape == (2, 3)


def test_settings_build_the_stage_config_and_refuse_bad_vision_values():
    from app.settings import Settings

    config = Settings.from_env({"MMSERVE_REMOTE_IMAGE_HOSTS": "img.example.com, *.cdn.test", "MMSERVE_VISUAL_TOKENS": "0.25",
                                "MMSERVE_FEATURE_CACHE_DIR": "/tmp/features", "MMSERVE_ENCODER_MAX_BATCH": "8",
                                "MMSERVE_MAX_IMAGE_BYTES": "1000"}).vision_stage_config
    assert config.fetch.allowed_hosts == ("img.example.com", "*.cdn.test") and config.fetch.max_bytes == 1000
    assert (config.default_visual_tokens, config.disk_dir, config.max_batch) == (0.25, "/tmp/features", 8)
    default = Settings().vision_stage_config
    assert not default.fetch.enabled and default.disk_dir is None and default.fetch.timeout_s == 5.0
    for bad in ({"visual_tokens": "2.5"}, {"visual_tokens": "a few"}, {"remote_image_hosts": "https://x.test"},
                {"visual_token_reduction": "zip"}, {"encoder_max_batch": 0}, {"remote_image_timeout_s": 0.0}):
        with pytest.raises(ValueError):
            Settings(**bad)


def test_mllama_features_keep_their_attended_tiles_through_both_cache_tiers(tmp_path):
    """Llama-3.2-Vision's encoder behind the same stage: its features come back from the hot and the disk
    tier with `attended_tokens` (the decoder's padding-tile mask needs it), and reducing them is refused."""
    from vision.encoders.mllama import MllamaVisionEncoder
    from tests.test_mllama_oracle import PREPROCESS, SMALL_VISION, TINY_TEXT, random_mllama

    mllama = MllamaVisionEncoder.from_hf_model(random_mllama(TINY_TEXT, SMALL_VISION), PREPROCESS)
    data = png(21, size=(20, 40))  # two of four tiles
    expected = mllama.encode([Image.open(io.BytesIO(data)).convert("RGB")])[0]
    assert expected.attended_tokens < expected.tokens.shape[0]
    config = VisionStageConfig(disk_dir=str(tmp_path / "features"), disk_bytes=1 << 24)
    with VisionStage(mllama, config) as first:
        computed, hot = first.features(data), first.features(data)
        with pytest.raises(VisualTokensError, match="cannot be reduced"):
            first.features(data, visual_tokens=4)
    with VisionStage(mllama, config) as second:
        from_disk = second.features(data)
    assert (computed.source, hot.source, from_disk.source) == ("computed", "hot", "disk")
    for result in (computed, hot, from_disk):
        assert result.features.attended_tokens == expected.attended_tokens
        assert torch.allclose(result.features.tokens, expected.tokens, atol=1e-6)
