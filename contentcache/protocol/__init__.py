"""
Protocol adapters: each translates one package protocol into cache lookups
and upstream fetches.
"""
