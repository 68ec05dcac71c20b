"""HTTP serving: FastAPI app, micro-batcher, schemas, metrics and the web page.

The server imports the core (answerers, data, eval); nothing in the core imports the server.
"""
