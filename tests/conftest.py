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
