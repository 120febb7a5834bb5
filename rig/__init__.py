"""patchrig daemon: frame sources, localiser worker, controllers, ZeroMQ server, CLI, client."""

__version__ = "0.1.0"
