"""The answer layer: what every answering system returns, and the plain causal-LM answerer.

  types.py      Answer, Answerer (the protocol), RequestRejected / InputTooLong (request faults)
  causal_lm.py  CausalLMAnswerer: one causal LM as an Answerer (option scoring, batched greedy
                generation, the long-input rule `fit`), open_prompt
  streaming.py  token streaming: TextSink (worker thread -> event loop), RowStreams (per-row streamer
                and stop rule for `generate`), ResumedSink

The server (medmoe.serve) and the routed MambaFormer answerer (medmoe.mambaformer.answerer) both build
on these; importing this package loads only `types` (no torch).
"""

from medmoe.answer.types import Answer, Answerer, InputTooLong, RequestRejected

__all__ = ["Answer", "Answerer", "InputTooLong", "RequestRejected"]
