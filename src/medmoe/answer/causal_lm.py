"""One causal LM as an `Answerer` (medmoe.answer.types): option questions through their format's option
head (docs/heads.md) or by option log-likelihood, open ones by batched generation (greedy, or sampled per row: `Generation`), streamed to a request's sink when it has one
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
from transformers import LogitsProcessor

from medmoe.answer.streaming import RowStreams, TextSink, cut_at_stop
from medmoe.answer.types import MAX_NEW_TOKENS, Answer, Generation, InputTooLong
from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.eval.batch_scoring import score_options_batch
from medmoe.eval.prompts import LABELS, build_prompt, language_of, question_block, uses_chat
from medmoe.eval.scoring import bos_ids
from medmoe.eval.window import cut_context
from medmoe.heads.answerer import head_logits_batch
from medmoe.heads.bundled import HeadSet
from medmoe.models.head import HeadConfig, OptionHead


def open_prompt(record: Record, tokenizer: Any) -> str:
    """The generation prompt for an open question: context and question, then the answer slot.

    With a system prompt (metadata, `Generation.system`) it is the chat template's system message; a
    template that refuses a system role, or drops its text, gets it before the question in the user
    message instead (as does a tokenizer without a chat template). A raw prompt (`Generation.raw`: a
    legacy completion) is the question itself, continued as it is."""
    settings = Generation.of(record.metadata)
    if settings.raw:
        return record.question
    text = question_block(replace(record, options=()))
    if uses_chat(tokenizer):
        return chat_prompt(tokenizer, text, settings.system)
    system = f"{settings.system}\n\n" if settings.system else ""
    return f"{system}{text}\n{LABELS[language_of(record)][2]}:"


def chat_prompt(tokenizer: Any, text: str, system: str | None = None) -> str:
    """`text` as the user's turn of the chat template, after `system` as the system turn when given."""
    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    if system:
        try:
            rendered = render([{"role": "system", "content": system}, {"role": "user", "content": text}])
        except Exception:  # noqa: BLE001 - templates refuse a system role by raising (jinja's raise_exception, any type)
            rendered = None
        if rendered is not None and system.strip() in rendered:
            return rendered
        text = f"{system}\n\n{text}"  # no system role: the system prompt opens the user's message
    return render([{"role": "user", "content": text}])


class PromptWindow:
    """The long-input rule of an answerer that has `prompt_tokens(record)`, `max_input_tokens`, `name` and
    `tokenizer`: `fit` cuts the context to the window (the rule `medmoe eval` uses), `check_fits` refuses a
    prompt over it. Shared by the torch and llama.cpp answerers; each counts tokens its own way."""

    prompt_tokens: Any
    max_input_tokens: int
    name: str
    tokenizer: Any

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



class CausalLMAnswerer(PromptWindow):
    """Answers with one causal LM: option questions by option log-likelihood, open ones by greedy (or
    sampled, per record: medmoe.answer.types.Generation) generation. A batch's option questions share
    padded forward passes (those a head answers, then the others), its open ones one `generate` call.

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
        """Records a head answers (their format's head, docs/heads.md) from shared right-padded passes
        (heads.answerer.head_logits_batch: the hidden states of every layer their heads read and the
        option log-probs, whatever head each row has); the rest in one batched forward by the
        expert's own option likelihoods."""
        answers: dict[int, Answer] = {}
        plain = []
        headed: list[tuple[int, OptionHead, HeadConfig]] = []
        for i, record in enumerate(records):
            found = self.heads.for_record(record) if self.heads is not None else None
            if found is None:
                plain.append(i)
            else:
                headed.append((i, *found))
        items = [(head, config, build_prompt(records[i], self.tokenizer), len(records[i].options)) for i, head, config in headed]
        for (i, _, config), (logits, _, _) in zip(headed, head_logits_batch(self.model, self.tokenizer, items) if items else []):
            probs = torch.softmax(logits, dim=0).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            answers[i] = Answer(answer=records[i].letters[best], expert=f"{self.name}+head({config.kind})",
                                label_scores=dict(zip(records[i].letters, probs)))
        prompts = [build_prompt(records[i], self.tokenizer) for i in plain]
        for i, scores in zip(plain, score_options_batch(self.model, self.tokenizer, prompts) if plain else []):
            probs = scores.probabilities()
            best = max(range(len(probs)), key=probs.__getitem__)
            answers[i] = Answer(answer=records[i].letters[best], expert=self.name,
                                label_scores=dict(zip(records[i].letters, probs)))
        return [answers[i] for i in range(len(records))]

    @torch.inference_mode()
    def _generate(self, records: Sequence[Record], sinks: Sequence[TextSink | None] | None = None) -> list[Answer]:
        """Decoding for a batch of open questions, left-padded into one `generate` call: greedy, or
        sampled for the rows whose settings say so (`RowSampler`), each row at its own temperature,
        top_p and random generator.

        A `RowStreams` follows the rows that are streamed or have stop sequences: it streams each
        streamed row's text and stops rows at their own limit, at a stop sequence, or when their
        client is gone; the tokens of the rows that run to the end are the same either way. Without
        sampling, streams or stop sequences this is the plain greedy `generate` call."""
        tok = self.tokenizer
        settings = [Generation.of(r.metadata) for r in records]
        encoded = [tok(open_prompt(r, tok), add_special_tokens=False)["input_ids"] for r in records]
        prompts = [bos_ids(tok, ids) + ids for ids in encoded]
        limits = [min(int(r.metadata.get(MAX_NEW_TOKENS, self.max_new_tokens)), self.max_new_tokens) for r in records]
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (b, n_max), left-padded
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        from transformers import LogitsProcessorList, StoppingCriteriaList

        device = next(self.model.parameters()).device
        streamed = sinks is not None and any(s is not None for s in sinks)
        streams = (RowStreams(tok, sinks, limits, width, [g.stop for g in settings], [g.raw for g in settings])
                   if streamed or any(g.stop for g in settings) else None)
        extra: dict[str, Any] = {"stopping_criteria": StoppingCriteriaList([streams])} if streams is not None else {}
        if any(g.sampled for g in settings):
            extra["logits_processor"] = LogitsProcessorList([RowSampler(settings)])
        generated = self.model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(limits),
            do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id, **extra,
        )[:, width:]  # (b, new): only the continuation
        out = []
        for row, limit in enumerate(limits):
            tokens = generated[row, :limit].tolist()
            stopped_at = streams.stopped_at[row] if streams is not None else None
            if stopped_at is not None:  # a stop sequence: the text before it
                count, reason = stopped_at, "stop"
                text = cut_at_stop(tok.decode(tokens[:stopped_at], skip_special_tokens=True), settings[row].stop)[0]
            else:
                if tok.eos_token_id in tokens:
                    tokens = tokens[: tokens.index(tok.eos_token_id)]
                    count, reason = len(tokens) + 1, "stop"
                else:
                    count, reason = len(tokens), "length"
                text = tok.decode(tokens, skip_special_tokens=True)
            out.append(Answer(answer=text if settings[row].raw else text.strip(), expert=self.name,
                              finish_reason=reason, prompt_tokens=len(prompts[row]), completion_tokens=count))
            if streams is not None:
                streams.finish(row, out[-1].answer)
        return out


class RowSampler(LogitsProcessor):
    """A logits processor for `generate` that samples the next token of each sampled row: softmax of
    logits / temperature, cut to the top_p nucleus, one draw from the row's own `torch.Generator`
    (seeded with its seed, else at random) by inverse CDF; the row's scores then leave only that
    token, so greedy `generate` takes it. Greedy rows pass through untouched. One uniform draw per
    sampled row and step; everything else is batched tensor work. A row's draws do not depend on the
    other rows of its batch, so a seed gives the same text in any batch (up to float rounding of
    the logits)."""

    def __init__(self, settings: Sequence[Generation]):
        rows = [i for i, g in enumerate(settings) if g.sampled]
        self.rows = torch.tensor(rows)
        self.temperature = torch.tensor([[settings[i].temperature] for i in rows])  # (r, 1)
        self.top_p = torch.tensor([[settings[i].top_p] for i in rows])  # (r, 1)
        self.generators = [torch.Generator() for _ in rows]  # on the CPU: the same draws on any device
        for generator, i in zip(self.generators, rows):
            seed = settings[i].seed
            if seed is None:
                generator.seed()  # a fresh random seed (the server always gives one)
            else:
                generator.manual_seed(seed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        device = scores.device
        rows = self.rows.to(device)
        probs = torch.softmax(scores[rows].float() / self.temperature.to(device), dim=-1)  # (r, V)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < self.top_p.to(device)  # the nucleus; the top token always
        cdf = (sorted_p * keep).double().cumsum(-1)  # (r, V)
        draws = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators]).to(device)
        pick = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True)  # (r, 1)
        pick = torch.minimum(pick, keep.sum(-1, keepdim=True) - 1)  # a draw at the very top stays in the nucleus
        chosen = order.gather(-1, pick)  # (r, 1) token ids
        out = scores.clone()
        out[rows] = -torch.inf
        out[rows, chosen[:, 0]] = 0.0
        return out
