"""
The Go module proxy (GOPROXY) protocol.
"""
