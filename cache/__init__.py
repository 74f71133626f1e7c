"""The content-hashed feature cache (hot tier in memory, persistent tier on disk)."""
