"""
The proxy's HTTP routes, one module per API: C{openai} (C{/v1/*}), C{ollama} (C{/api/*}) and
C{admin} (C{/status}, C{/unload}, C{/health}, C{/metrics}, C{/logs}, C{/}).
"""
