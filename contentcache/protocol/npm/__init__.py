"""
The npm registry protocol.
"""
