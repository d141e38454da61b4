"""`streamdit serve`: live generation in a browser, steered while it runs (rank0 hosts the server).

`hub` fans frames out to clients, `app` is the page, the WebSocket and the JSON API, `main` ties
them to rank0's stream. Only `cli.py` imports this package; it imports `runtime` (never the other
way round), so `run` never loads the web stack.
"""
