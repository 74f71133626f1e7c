"""The vision stage: image intake with hard limits, allow-listed remote fetch, preprocessing, the encoder and
its micro-batcher, token reduction, and `VisionStage`, which ties them to the feature cache."""
