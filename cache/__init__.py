"""The content-hashed feature cache (hot tier in memory, persistent tier on disk).

Stands alone: it knows tensors and keys, nothing of models. The serving path builds a `FeatureKey`
from the image bytes and the encoder setup and calls `FeatureCache.get_or_compute`.
"""

from cache.codec import CorruptEntry
from cache.feature_cache import FeatureCache, Source
from cache.key import FeatureKey, image_digest

__all__ = ["CorruptEntry", "FeatureCache", "FeatureKey", "Source", "image_digest"]
