"""The mmserve service: settings, the litestar app, the CLI."""
