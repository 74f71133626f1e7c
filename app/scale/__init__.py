"""Scaling out: Ray Serve replicas of the same app, Ray Data batch captioning, and what they share."""
