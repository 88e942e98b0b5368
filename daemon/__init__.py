"""The ttsd daemon. Empty so that `ttsd.daemon.protocol` imports without torch."""
