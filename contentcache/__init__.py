"""
contentcache: a pull-through cache for the npm registry and Go module proxy
protocols, backed by a BLAKE3 content-addressable store.
"""

__version__ = "0.1.0"
