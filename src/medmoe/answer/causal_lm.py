"""One causal LM as an `Answerer` (medmoe.answer.types): option questions by option log-likelihood,
open ones by batched greedy generation, streamed to a request's sink when it has one
(medmoe.answer.streaming). The server's default answerer (medmoe.serve.answerers) and the routed
MambaFormer system (medmoe.mambaformer.answerer, over its chosen expert) both answer with it.

The rule for long inputs (docs/serving.md): the prompt may hold at most `max_input_tokens` tokens
(and never more than the model's window minus `max_new_tokens`). When it is longer, the context
passage is cut at a token boundary, keeping its beginning, until the prompt fits; the response says
how many context tokens were dropped. When the question and options alone do not fit, the request is
rejected (InputTooLong: 422, naming the field `question`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, cast

import torch

from medmoe.answer.streaming import RowStreams, TextSink
from medmoe.answer.types import Answer, InputTooLong
from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.eval.batch_scoring import score_options_batch
from medmoe.eval.prompts import LABELS, build_prompt, language_of, question_block, uses_chat
from medmoe.eval.scoring import bos_ids
from medmoe.eval.window import cut_context
from medmoe.heads.answerer import head_logits
from medmoe.heads.bundled import HeadSet


def open_prompt(record: Record, tokenizer: Any) -> str:
    """The generation prompt for an open question: context and question, then the answer slot."""
    text = question_block(replace(record, options=()))
    if uses_chat(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return f"{text}\n{LABELS[language_of(record)][2]}:"


class CausalLMAnswerer:
    """Answers with one causal LM: option questions by option log-likelihood, open ones by greedy
    generation. Whole batches run in one forward pass (options) or one `generate` call (open).

    name:            reported as `Answer.expert`
    max_new_tokens:  generation limit (a record may lower it with metadata["max_new_tokens"])
    max_input_tokens: prompt limit in tokens (see the module docstring for the rule)
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, max_new_tokens: int = 64, max_input_tokens: int = 1024,
                 heads: HeadSet | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.heads = heads  # option heads by question format (heads/bundled.py); None: the expert's own answer
        self.max_new_tokens = max_new_tokens
        window = getattr(model.config, "max_position_embeddings", None) or max_input_tokens + max_new_tokens
        self.max_input_tokens = min(max_input_tokens, window - max_new_tokens)
        if self.max_input_tokens < 16:
            raise MedmoeError(f"max_input_tokens {self.max_input_tokens} leaves no room for a question (window {window}, max_new_tokens {max_new_tokens})")

    # -- optional protocol methods used by the server -------------------------------------------
    def batch_key(self, record: Record) -> str:
        return "options" if record.options else "open"

    def prompt_tokens(self, record: Record) -> int:
        text = build_prompt(record, self.tokenizer).context if record.options else open_prompt(record, self.tokenizer)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return len(bos_ids(self.tokenizer, ids)) + len(ids)

    def fit(self, record: Record) -> tuple[Record, int]:
        """(record that fits, number of context tokens dropped); InputTooLong if the question cannot fit."""
        limit = self.max_input_tokens
        if self.prompt_tokens(record) <= limit:
            return record, 0
        bare = self.prompt_tokens(replace(record, context=None))
        if not record.context or bare > limit:
            raise InputTooLong("question", bare, limit)
        return cut_context(record, self.prompt_tokens, self.tokenizer, limit)  # the rule `medmoe eval` uses too

    def check_fits(self, record: Record) -> None:
        """InputTooLong when the record's prompt, as it is, is over the limit (`fit` would have cut it):
        a record that did not go through `fit` fails alone, with a 422, instead of overrunning the window."""
        tokens = self.prompt_tokens(record)
        if tokens > self.max_input_tokens:
            raise InputTooLong("context" if record.context else "question", tokens, self.max_input_tokens,
                               f"the prompt is {tokens} tokens; {self.name} accepts at most {self.max_input_tokens} "
                               "(a longer context must be cut first, as the server does)")

    # -- Answerer ----------------------------------------------------------------------------------
    def answer_batch(self, records: Sequence[Record], sinks: Sequence[TextSink | None] | None = None) -> list[Answer]:
        """Answer every record; open records with a sink have their text streamed to it."""
        for record in records:
            self.check_fits(record)
        start = time.perf_counter()
        answers: list[Answer | None] = [None] * len(records)
        choice = [i for i, r in enumerate(records) if r.options]
        open_ = [i for i, r in enumerate(records) if not r.options]
        if choice:
            for i, answer in zip(choice, self._answer_options([records[i] for i in choice])):
                answers[i] = answer
        if open_:
            open_sinks = [sinks[i] for i in open_] if sinks is not None else None
            for i, answer in zip(open_, self._generate([records[i] for i in open_], open_sinks)):
                answers[i] = answer
        elapsed = (time.perf_counter() - start) * 1000
        done = cast(list[Answer], answers)  # every slot is filled now
        for answer in done:
            answer.latency_ms["expert"] = elapsed  # the batch's compute time, shared by its members
        return done

    def _answer_options(self, records: Sequence[Record]) -> list[Answer]:
        """Records a head answers (their format's head, docs/heads.md) one pass each; the rest in one
        batched forward by the expert's own option likelihoods."""
        answers: dict[int, Answer] = {}
        plain = []
        for i, record in enumerate(records):
            found = self.heads.for_record(record) if self.heads is not None else None
            if found is None:
                plain.append(i)
                continue
            head, config = found
            prompt = build_prompt(record, self.tokenizer)
            logits, _, _ = head_logits(self.model, self.tokenizer, head, config, prompt, len(record.options))
            probs = torch.softmax(logits, dim=0).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            answers[i] = Answer(answer=record.letters[best], expert=f"{self.name}+head({config.kind})",
                                label_scores=dict(zip(record.letters, probs)))
        prompts = [build_prompt(records[i], self.tokenizer) for i in plain]
        for i, scores in zip(plain, score_options_batch(self.model, self.tokenizer, prompts) if plain else []):
            probs = scores.probabilities()
            best = max(range(len(probs)), key=probs.__getitem__)
            answers[i] = Answer(answer=records[i].letters[best], expert=self.name,
                                label_scores=dict(zip(records[i].letters, probs)))
        return [answers[i] for i in range(len(records))]

    @torch.inference_mode()
    def _generate(self, records: Sequence[Record], sinks: Sequence[TextSink | None] | None = None) -> list[Answer]:
        """Greedy decoding for a batch of open questions, left-padded into one `generate` call.

        With sinks, a `RowStreams` streams each row's text and stops rows at their own limit or when
        their client is gone; the tokens of the rows that run to the end are the same either way."""
        tok = self.tokenizer
        encoded = [tok(open_prompt(r, tok), add_special_tokens=False)["input_ids"] for r in records]
        prompts = [bos_ids(tok, ids) + ids for ids in encoded]
        limits = [min(int(r.metadata.get("max_new_tokens", self.max_new_tokens)), self.max_new_tokens) for r in records]
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (b, n_max), left-padded
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        from transformers import StoppingCriteriaList

        device = next(self.model.parameters()).device
        streams = RowStreams(tok, sinks, limits) if sinks is not None and any(s is not None for s in sinks) else None
        streaming = {"streamer": streams, "stopping_criteria": StoppingCriteriaList([streams])} if streams is not None else {}
        generated = self.model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(limits),
            do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id, **streaming,
        )[:, width:]  # (b, new): only the continuation
        out = []
        for row, limit in enumerate(limits):
            tokens = generated[row, :limit].tolist()
            if tok.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tok.eos_token_id)]
            out.append(Answer(answer=tok.decode(tokens, skip_special_tokens=True).strip(), expert=self.name))
            if streams is not None:
                streams.finish(row, out[-1].answer)
        return out
