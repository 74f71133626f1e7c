"""The vision stage: image intake with hard limits, preprocessing, the encoder, token reduction."""
