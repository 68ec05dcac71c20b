"""Token streaming for the server. The classes live in the answer layer (medmoe.answer.streaming:
TextSink, RowStreams, ResumedSink, settled, END), below both the server and the routed MambaFormer
answerer, which streams through them; the server's modules import them from here."""

from __future__ import annotations

from medmoe.answer.streaming import END, ResumedSink, RowStreams, TextSink, settled

__all__ = ["END", "ResumedSink", "RowStreams", "TextSink", "settled"]
