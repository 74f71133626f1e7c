from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from app.settings import BUNDLED_MODEL


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


@pytest.fixture(scope="session")
def demo_runtime():
    from app.models.families.coca import CoCaModel

    return CoCaModel.from_dir(BUNDLED_MODEL)


# The `slow` group: modules whose tests start real server processes one after another, or build big
# reference models (measured: each costs 40-130 s here). `pytest -q` (README command 2) leaves them out
# to stay near six minutes; .ci/run runs them next, with `pytest -q -m slow`.
SLOW_MODULES = frozenset({"test_cli", "test_batches_e2e", "test_bench_vision", "test_tenancy_e2e", "test_caption_dir",
                          "test_batch_leases", "test_drain", "test_schemathesis", "test_scale_parts"})
SLOW_TESTS = frozenset({"test_compiled_decode_steps_match_transformers"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
