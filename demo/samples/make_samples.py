"""Writes the sample image and the ready-to-send caption request printed by `mmserve serve`.

    python -m demo.samples.make_samples
"""

import base64
import json
from pathlib import Path

from demo import world

HERE = Path(__file__).resolve().parent
SAMPLE_SCENE = world.Scene("white", (
    world.Shape("circle", "red", "large", 48, 14.0, 40.0, (225, 45, 38)),
    world.Shape("square", "blue", "small", 24, 86.0, 52.0, (38, 84, 216)),
))


def main() -> None:
    image_path = HERE / "sample.png"
    world.render(SAMPLE_SCENE).save(image_path)
    url = "data:image/png;base64," + base64.b64encode(image_path.read_bytes()).decode()
    request = {"model": "mmserve-demo", "max_tokens": 16, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": world.CAPTION_QUESTION}]}]}
    (HERE / "caption_request.json").write_text(json.dumps(request) + "\n")
    print(world.caption(SAMPLE_SCENE))


if __name__ == "__main__":
    main()
