"""HTTP serving: FastAPI app, micro-batcher, schemas, metrics and the web page.

The server imports the core (answerers, data, eval); the core does not import the server, except
that the routed answerer (medmoe.mambaformer.answerer) generates with `serve.answerers.CausalLMAnswerer`.
"""
