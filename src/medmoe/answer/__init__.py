"""The answer layer: what every answering system returns, and the plain causal-LM answerer.

  types.py      Answer, Answerer (the protocol), RequestRejected / InputTooLong / InvalidParameter
                (request faults), Generation (an open record's generation settings)
  causal_lm.py  CausalLMAnswerer: one causal LM as an Answerer (option scoring, batched generation,
                greedy or sampled per row by RowSampler, the long-input rule `fit`), open_prompt
  streaming.py  token streaming: TextSink (worker thread -> event loop), RowStreams (per-row streaming
                and stop rule for `generate`: limits, stop sequences), ResumedSink
  llamacpp.py   LlamaCppAnswerer: a GGUF model run quantized by llama.cpp (the server's engine llama.cpp;
                extra `llamacpp`), the same prompts and answer rules as causal_lm

The server (medmoe.serve) and the routed MambaFormer answerer (medmoe.mambaformer.answerer) both build
on these; importing this package loads only `types` (no torch).
"""

from medmoe.answer.types import Answer, Answerer, InputTooLong, RequestRejected

__all__ = ["Answer", "Answerer", "InputTooLong", "RequestRejected"]
