"""`medmoe serve`: the HTTP server and web page (docs/serving.md)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)


def serve(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML file of server settings (see docs/serving.md)."),
    model: str | None = typer.Option(None, help="Model for the default answerer: bundled name, hub id or local path (default: smollm2-135m)."),
    adapter: str | None = typer.Option(None, help="Adapter folder from `medmoe finetune` (LoRA-MoE or PEFT LoRA) applied to --model."),
    heads: str | None = typer.Option(None, help="Option heads (docs/heads.md): bundled (medmoe's trained heads for --model; the default), none (the model's own option likelihoods), or comma-separated `medmoe heads train` folders."),
    answerer: str | None = typer.Option(None, help="Answerer factory 'module:callable' (e.g. the routed MambaFormer system)."),
    host: str | None = typer.Option(None, help="Interface to listen on (default: 127.0.0.1; use 0.0.0.0 to expose it)."),
    port: int | None = typer.Option(None, help="Port (default: 8000)."),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    max_batch_size: int | None = typer.Option(None, help="Requests per micro-batch (default: 16)."),
) -> None:
    """Serve a model over HTTP: POST /v1/answer, OpenAI-compatible /v1/chat/completions, the page at /.

    Starts with the bundled smollm2-135m by default; `--config` names a YAML file whose settings
    flags override. Open http://HOST:PORT/ in a browser to ask questions.

    Example: medmoe serve --model gemma3-270m --port 9000
    """
    from medmoe.errors import require

    require("fastapi", "serve", "`medmoe serve`")
    require("uvicorn", "serve", "`medmoe serve`")
    import uvicorn

    from medmoe.serve.app import app_from_config
    from medmoe.serve.config import ServeConfig

    head_setting: list[str] | str | None = heads if heads in (None, "bundled", "none") else [h for h in heads.split(",") if h]
    overrides = {"model": model, "adapter": adapter, "heads": head_setting, "answerer": answerer, "host": host, "port": port, "threads": threads, "max_batch_size": max_batch_size}
    settings = ServeConfig.from_yaml(config, **overrides) if config else ServeConfig.from_dict({}, "flags", **overrides)
    with console.status(f"loading {settings.model if settings.answerer.endswith('load_causal_lm_answerer') else settings.answerer}..."):
        app = app_from_config(settings)
    console.print(f"medmoe serving on http://{settings.host}:{settings.port}/  (Ctrl-C stops)")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=10)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
