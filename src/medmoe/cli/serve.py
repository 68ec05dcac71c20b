"""`medmoe serve`: the HTTP server and web page (docs/serving.md)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from medmoe.cli.placement import device_option, dtype_option

if TYPE_CHECKING:
    from medmoe.serve.config import ServeConfig

console = Console(stderr=True)
SERVE_DTYPE_HELP = ("The single model's dtype: float32 (the default, as before this flag), bfloat16, float16 or auto "
                    "(bfloat16 on a CUDA GPU that has it and on CPUs with AVX512-BF16 or AMX, else float32); a Mamba hybrid "
                    "on CPU stays float32. YAML: dtype. Not with --router: the router loads each expert in the dtype it "
                    "was calibrated with (router.json).")
SERVE_DEVICE_HELP = ("The single model's torch device: auto (the default: cuda when torch sees a GPU, else cpu), cpu, cuda, "
                     "cuda:N or mps. YAML: device. Not with --router (router.json places its experts).")

SERVE_ENGINE_HELP = ("What runs the single model: torch (the default), llama.cpp (its GGUF file, quantized, on CPU: a bundled "
                     "GGUF model or a .gguf path; no --adapter, head folders or --dtype; needs pip install llama-cpp-python) "
                     "or vllm (GPU servers; not implemented yet). YAML: engine. Not with --router (its experts run on torch).")


def serve(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML file of server settings (see docs/serving.md)."),
    model: str | None = typer.Option(None, help="Model for the default answerer: bundled name, hub id or local path (default: smollm2-135m)."),
    adapter: str | None = typer.Option(None, help="Adapter folder from `medmoe finetune` (LoRA-MoE or PEFT LoRA) applied to --model."),
    heads: str | None = typer.Option(None, help="Option heads (docs/heads.md): bundled (medmoe's trained heads for --model; the default), none (the model's own option likelihoods), or comma-separated `medmoe heads train` folders."),
    answerer: str | None = typer.Option(None, help="Answerer factory 'module:callable' (a custom system)."),
    router: str | None = typer.Option(None, help="Serve the routed MambaFormer system from this router checkpoint folder (`medmoe run` writes OUTPUT/DATASET/router; it names both experts). Not with --model, --adapter, --heads or --answerer. Default: the main job's router, runs/mambaformer/pubmedqa/router under the working directory, when it is there and none of --model, --adapter, --heads, --answerer, --config is given."),
    host: str | None = typer.Option(None, help="Interface to listen on (default: 127.0.0.1; use 0.0.0.0 to expose it)."),
    port: int | None = typer.Option(None, help="Port (default: 8000)."),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    max_batch_size: int | None = typer.Option(None, help="Requests per micro-batch (default: 16)."),
    dtype: str | None = dtype_option(None, help=SERVE_DTYPE_HELP),
    device: str | None = device_option(None, help=SERVE_DEVICE_HELP),
    engine: str | None = typer.Option(None, help=SERVE_ENGINE_HELP),
) -> None:
    """Serve a model over HTTP: POST /v1/answer, OpenAI-compatible /v1/chat/completions, the page at /.

    Serves the routed MambaFormer system with --router DIR, and by default when the main job's router
    (runs/mambaformer/pubmedqa/router) is there; otherwise the bundled smollm2-135m (or --model).
    A request to the routed system may choose its threshold: model `mambaformer-tau-0.35`, or
    `"routing": {"tau": 0.35}` in the body. `--config` names a YAML file whose settings flags
    override. Open http://HOST:PORT/ in a browser to ask questions.

    Example: medmoe serve --router runs/mambaformer/pubmedqa/router --port 9000
    """
    from medmoe.errors import require

    require("fastapi", "serve", "`medmoe serve`")
    require("uvicorn", "serve", "`medmoe serve`")
    import uvicorn

    from medmoe.errors import MedmoeError
    from medmoe.serve.app import app_from_config

    settings, why = serve_settings(config, model, adapter, heads, answerer, router, host, port, threads, max_batch_size,
                                   dtype, device, engine)
    console.print(why)
    with console.status(f"loading {settings.router or (settings.model if settings.answerer.endswith('load_causal_lm_answerer') else settings.answerer)}..."):
        try:
            app = app_from_config(settings)
        except MedmoeError as exc:
            if "main job's router" in why:  # served without being asked for: say how to serve something else
                raise MedmoeError(f"{exc}\n(the main job's router is served by default; --model smollm2-135m serves the "
                                  "single model, --router DIR another router)") from None
            raise
    if app.state.routing.routed:
        console.print(f"routing: {app.state.routing.describe()}")
    console.print(f"medmoe serving on http://{settings.host}:{settings.port}/  (Ctrl-C stops)")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=10)


def serve_settings(config: Path | None, model: str | None, adapter: str | None, heads: str | None, answerer: str | None,
                   router: str | None, host: str | None = None, port: int | None = None, threads: int | None = None,
                   max_batch_size: int | None = None, dtype: str | None = None,
                   device: str | None = None, engine: str | None = None) -> tuple[ServeConfig, str]:
    """The server's settings from the flags (and --config), and a line saying which system is served and why.
    --router excludes the single-model flags; without any of them (and no --config) the main job's router
    is served when it is there (medmoe.serve.config.MAIN_JOB_ROUTER)."""
    from medmoe.serve.config import DEFAULT_FACTORY, MAIN_JOB_ROUTER, ServeConfig, main_job_router

    single = {"--model": model, "--adapter": adapter, "--heads": heads, "--answerer": answerer, "--dtype": dtype,
              "--device": device, "--engine": engine}
    given = [flag for flag, value in single.items() if value is not None]
    if router is not None and given:
        raise typer.BadParameter(f"--router and {', '.join(given)} cannot be used together: --router serves the routed "
                                 f"MambaFormer system, whose two experts its router.json names; {', '.join(given)} "
                                 "set up a single model. Give one or the other.", param_hint="--router")
    reason = "--router"
    if router is None and not given and config is None:
        found = main_job_router()
        if found is not None:
            router, reason = str(found), "the main job's router"
    head_setting: list[str] | str | None = heads if heads in (None, "bundled", "none") else [h for h in (heads or "").split(",") if h]
    overrides = {"model": model, "adapter": adapter, "heads": head_setting, "answerer": answerer, "router": router,
                 "host": host, "port": port, "threads": threads, "max_batch_size": max_batch_size, "dtype": dtype,
                 "device": device, "engine": engine}
    settings = ServeConfig.from_yaml(config, **overrides) if config else ServeConfig.from_dict({}, "flags", **overrides)
    if settings.router is not None:
        if config is not None and router is None:
            reason = f"router: in {config}"
        return settings, (f"serving the routed MambaFormer system from {settings.router} ({reason}); "
                          "--model smollm2-135m for the single model")
    if settings.answerer != DEFAULT_FACTORY:
        return settings, f"serving the answerer {settings.answerer}"
    hint = (f"no router at {MAIN_JOB_ROUTER}" if not given and config is None else "")
    placement = ("llama.cpp, its GGUF quantized, on CPU" if settings.engine == "llama.cpp"
                 else f"{settings.dtype}, device {settings.device}")
    return settings, (f"serving the single model {settings.model}"
                      + (f" with adapter {settings.adapter}" if settings.adapter else "")
                      + f" ({placement})"
                      + (f" ({hint}; --router DIR for the routed MambaFormer system)" if hint
                         else " (--router DIR for the routed MambaFormer system)"))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
