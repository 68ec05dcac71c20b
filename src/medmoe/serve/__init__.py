"""HTTP serving: FastAPI app, server-sent event streams, micro-batcher, admission, per-request routing, schemas, metrics and the web page.

The server imports the layers below it (answer, mambaformer, eval, data); none of them imports the
server. The routed MambaFormer system (medmoe.mambaformer.answerer) and the single model both answer
through the answer layer's `CausalLMAnswerer` (docs/architecture.md).
"""
