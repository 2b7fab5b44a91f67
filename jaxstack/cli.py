"""The ``jaxstack`` command: demo, train, plan, generate, convert, serve.

Every bad input (unknown config key, a batch that does not divide over the devices, a
missing checkpoint, ...) ends in one line ``jaxstack: error: ...`` that says how to fix it.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import absl.logging
import jax

from jaxstack import hf
from jaxstack.checkpoint import CheckpointError
from jaxstack.data import load_tokenizer
from jaxstack.data.text import resolve_paths
from jaxstack.distributed import initialize
from jaxstack.generate import complete
from jaxstack.hf.saving import HF_SUBDIR
from jaxstack.mesh import make_mesh
from jaxstack.metrics import long_step
from jaxstack.models import PRESETS, preset
from jaxstack.overrides import field_names, parse_overrides
from jaxstack.planning import choose_mesh, plan_notes, plan_run
from jaxstack.run import (
    RUN_FILE,
    RunConfig,
    export_hf,
    has_checkpoint,
    is_converted,
    load_run,
    train,
)
from jaxstack.trainer import NonFiniteError, TrainConfig
from jaxstack.workdir import ERROR_LOG, WorkDirBusyError, is_local, work_path
from jaxstack.xla_flags import apply_xla_flags
from sharding_rules import format_plan

if TYPE_CHECKING:  # the server's settings load with `serve` only
    from jaxstack.serve.server_config import ServerConfig

RUN_FAILURES = (CheckpointError, NonFiniteError, WorkDirBusyError)
"""Failures of a run (not of its command line): one line, exit status 1."""

DEMO_PROMPTS = ["def ", "import ", "class ", "    return "]


def _split_overrides(extra: list[str]) -> dict[str, str]:
    """``["--train.batch_size", "16", "--model.dtype=bfloat16"]`` -> ``{key: text}``."""
    overrides, items = {}, list(extra)
    while items:
        item = items.pop(0)
        if not item.startswith("--"):
            raise ValueError(
                f"unexpected argument {item!r}; overrides look like --train.num_steps 100"
            )
        key, eq, value = item[2:].partition("=")
        if not eq:
            if not items:
                raise ValueError(f"override --{key} needs a value")
            value = items.pop(0)
        overrides[key] = value
    return overrides


def _print_samples(prompts: list[str], samples: list[str]) -> None:
    for prompt, sample in zip(prompts, samples, strict=True):
        print(f"--- prompt {prompt!r}\n{prompt}{sample}\n")


def _say_xla_flags(args: argparse.Namespace) -> None:
    """Say which XLA flags ``main`` applied at start-up, if it applied any, in the run's own
    output (stdout), once the command's input is known to be good; stderr keeps only a
    failure's one line."""
    if args.xla_flags:
        print(f"jaxstack: {args.xla_flags}")


def cmd_demo(args: argparse.Namespace) -> None:
    """Train the tiny model on this Python's stdlib sources, then sample from it."""
    _say_xla_flags(args)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="jaxstack-demo-")
    devices = jax.device_count()
    run = RunConfig(
        train=TrainConfig(
            work_dir=work_dir,
            batch_size=max(16 // devices, 1) * devices,  # 16, or a multiple of the devices
            num_steps=args.steps,
            learning_rate=3e-3,
            warmup_steps=min(20, args.steps),
            eval_every=max(args.steps // 2, 1),
            eval_batches=4,
            save_every=max(args.steps // 2, 1),
            log_every=max(args.steps // 10, 1),
        ),
    )
    print(f"jaxstack demo: tiny Llama ({run.model.num_params():,} params) on stdlib sources")
    print(f"work dir: {work_dir}")
    start = time.perf_counter()
    trainer, records = train(run)
    print(f"trained {trainer.step} steps in {time.perf_counter() - start:.0f}s")
    if len(records) >= 2:
        first, last = records[0], records[-1]
        verdict = "fell" if last["loss"] < first["loss"] else "DID NOT FALL"
        print(
            f"loss {verdict}: {first['loss']:.3f} (step {first['step']}) -> "
            f"{last['loss']:.3f} (step {last['step']})"
        )
    _, model, params = load_run(work_dir)
    tokenizer = load_tokenizer(run.data.tokenizer)
    samples = complete(
        model, params, tokenizer, DEMO_PROMPTS, max_new_tokens=120, temperature=0.7, top_k=20
    )
    _print_samples(DEMO_PROMPTS, samples)
    print(f"continue it: jaxstack generate --work-dir {work_dir} --prompt 'def '")


def _run_config(args: argparse.Namespace, extra: list[str]) -> RunConfig:
    """The run of ``--model``, then ``--config``, then the overrides, built and validated once
    at the end: a check across fields sees the values they ended with, whatever the order
    of the flags."""
    raw = {}
    if args.config:
        path = Path(args.config)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {path} is not valid JSON: {error}") from None
    overrides = _split_overrides(extra)
    init_hf = overrides.get("init.hf") or (raw.get("init") or {}).get("hf")
    work_dir = overrides.get("train.work_dir") or (raw.get("train") or {}).get("work_dir")
    converted = not init_hf and work_dir is not None and is_converted(work_dir)
    if args.model and (init_hf or converted):
        source = f"--init.hf {init_hf}" if init_hf else f"the converted work dir {work_dir}"
        raise ValueError(
            f"--model {args.model} and {source} both choose the model; drop --model (the "
            "model comes from the Hugging Face config.json)"
        )
    if init_hf:  # the model (and tokenizer) of a Hugging Face directory
        own_tokenizer = "data.tokenizer" in overrides or "tokenizer" in (raw.get("data") or {})
        check_model_dir(init_hf, "--init.hf", tokenizer=not own_tokenizer)
        run = RunConfig.from_hf(init_hf)
    elif converted:  # jaxstack convert --to jaxstack wrote it: its hf/ config and tokenizer
        run = RunConfig.from_hf(work_path(work_dir) / HF_SUBDIR, weights=False)
    else:
        run = RunConfig(model=preset(args.model)) if args.model else RunConfig()
        run = run.with_family_of(raw)
    changes = parse_overrides(run, overrides)
    return RunConfig.from_dict(_merge(_merge(run.to_dict(), raw), changes))


def check_paths(args: argparse.Namespace, run: RunConfig | None = None) -> None:
    """Check the paths a command reads, before anything is loaded, and name what is missing
    in the command's terms: no model directory, one without config.json, weights or a
    tokenizer; a work dir without a run or a checkpoint; data or a tokenizer of ``run``.

    Raises:
        FileNotFoundError: one line naming the flag, the path and what it lacks.
    """
    if getattr(args, "hf", None):
        check_model_dir(args.hf, "--hf")
    if args.command in ("generate", "serve") and args.work_dir:
        check_run_dir(args.work_dir, "--work-dir", needs_run=True)
    if args.command == "convert":
        if args.to == "jaxstack":
            check_model_dir(args.source, "SOURCE", tokenizer=False)
        else:
            check_run_dir(args.source, "SOURCE", needs_run=False)
    if run is not None:
        spec = run.data.tokenizer
        if spec != "byte" and not Path(spec).exists():
            raise FileNotFoundError(
                f"--data.tokenizer {spec}: no such file or directory; give 'byte', a "
                "tokenizer.json, or a Hugging Face model directory holding one"
            )
        if run.data.source != "stdlib":
            try:
                resolve_paths(run.data.source)
            except FileNotFoundError as error:
                raise FileNotFoundError(f"--data.source: {error}") from None


def check_model_dir(path: str, flag: str, tokenizer: bool = True) -> None:
    """``path`` is a Hugging Face model directory: config.json, safetensors weights and (with
    ``tokenizer``) tokenizer.json; otherwise ``FileNotFoundError`` saying which is missing."""
    directory = Path(path)
    wanted = "a local Hugging Face model directory (config.json, *.safetensors weights" + (
        ", tokenizer.json)" if tokenizer else ")"
    )
    if not directory.exists():
        raise FileNotFoundError(f"{flag} {path}: no such model directory; give {wanted}")
    if not directory.is_dir():
        raise FileNotFoundError(f"{flag} {path} is a file, not a model directory; give {wanted}")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"model directory {path} has no config.json; is it a Hugging Face model directory? "
            f"({flag} wants {wanted})"
        )
    if not any(directory.glob("*.safetensors")):
        torch_files = sorted(p.name for p in directory.glob("*.bin")) + sorted(
            p.name for p in directory.glob("*.pt")
        )
        hint = (
            f"; it has PyTorch weights ({', '.join(torch_files[:3])}): save them as safetensors "
            "with transformers' save_pretrained(DIR, safe_serialization=True)"
            if torch_files
            else ""
        )
        raise FileNotFoundError(f"model directory {path} has no weights (*.safetensors){hint}")
    if tokenizer and not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"model directory {path} has no tokenizer (tokenizer.json); copy the model's "
            "tokenizer.json into it (AutoTokenizer.from_pretrained(...).save_pretrained(DIR) "
            "writes one)"
        )


def check_run_dir(path: str, flag: str, needs_run: bool) -> None:
    """``path`` is a work dir with a checkpoint and (``needs_run``) the ``run.json`` of a
    train/demo run, else of a run or a ``jaxstack convert --to jaxstack`` output; otherwise
    ``FileNotFoundError`` saying which is missing."""
    directory = work_path(path)
    if not directory.exists():
        raise FileNotFoundError(
            f"{flag} {path}: no such work dir; give the --train.work_dir of a jaxstack "
            "train or demo run"
        )
    converted = (directory / HF_SUBDIR / "config.json").exists()
    if not (directory / RUN_FILE).exists() and (needs_run or not converted):
        what = (
            "a model converted from Hugging Face, not a training run: use the original "
            "directory with --hf, or export it with jaxstack convert --to hf"
            if converted
            else "not a jaxstack run; give the --train.work_dir of a train or demo run"
        )
        raise FileNotFoundError(f"work dir {path} has no {RUN_FILE}: it is {what}")
    if not has_checkpoint(directory):
        raise FileNotFoundError(
            f"work dir {path} has no checkpoint yet (checkpoints/ is empty); train it first: "
            f"jaxstack train --train.work_dir {path}"
        )


def cmd_train(args: argparse.Namespace, extra: list[str]) -> None:
    """Train (or resume) a run from an optional JSON config plus --key value overrides."""
    run = _run_config(args, extra)
    if args.print_config:
        print(json.dumps(run.to_dict(), indent=2))
        return
    check_paths(args, run)
    _say_xla_flags(args)
    if initialize():  # joins the multi-host job under SLURM / TPU pods / JAX_* env vars
        print(
            f"jaxstack: process {jax.process_index()} of {jax.process_count()}, "
            f"{jax.local_device_count()} of {jax.device_count()} devices"
        )
    work_dir = work_path(run.train.work_dir)
    # a remote work dir cannot take a streaming log: library logs then stay on this host
    log_dir = Path(work_dir) if is_local(work_dir) else Path(tempfile.mkdtemp(prefix="jaxstack-"))
    _library_logs_to(log_dir / ERROR_LOG)
    resume = "overwrite" if args.overwrite else "force" if args.resume else "auto"
    trainer, records = train(run, resume=resume)
    if records:
        print(json.dumps(records[-1]))
    latest = trainer.checkpoints.latest_step()
    if latest is not None:
        print(f"checkpoint at step {latest} in {run.train.work_dir}")


def _library_logs_to(path: Path) -> None:
    """Send absl logging (Orbax's warnings and background-thread tracebacks) and exceptions
    that Python can only report (in threads, in callbacks of a closed event loop) to
    ``path`` instead of the console, where a failing run prints its one line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    absl_logger = logging.getLogger("absl")
    absl_logger.addHandler(handler)
    absl_logger.propagate = False
    background = logging.getLogger("jaxstack.background")
    background.addHandler(handler)
    background.propagate = False

    def report(hook_args) -> None:
        error = hook_args.exc_value
        background.error("unraisable / thread exception", exc_info=error)

    sys.unraisablehook = report
    threading.excepthook = report


def cmd_plan(args: argparse.Namespace, extra: list[str]) -> None:
    """Print the sharding and memory plan of a run (nothing is allocated)."""
    run = _run_config(args, extra)
    devices = args.devices or jax.device_count()
    if run.mesh == "auto":
        memory = int(args.device_memory_gb * 2**30) if args.device_memory_gb else None
        choice = choose_mesh(run, devices, memory)
        print(f"mesh=auto over {devices} devices: candidates (data, fsdp, tensor):")
        for c in choice.candidates:
            verdict = (c.rejected or "fits").split(". ")[0]
            sizes = (c.axis_sizes["data"], c.axis_sizes["fsdp"], c.axis_sizes["tensor"])
            print(f"  {sizes}: {verdict}; comm {c.comm_bytes / 2**30:.3g} GiB/step")
        run = dataclasses.replace(
            run, mesh=",".join(f"{a}={n}" for a, n in choice.axis_sizes.items())
        )
    plan = plan_run(run, devices)
    print("\n".join([format_plan(plan), *plan_notes(run, plan)]))


def _merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if key not in base:
            raise KeyError(f"unknown config key {key!r}; valid keys: {', '.join(base)}")
        base[key] = _merge(base[key], value) if isinstance(value, dict) and base[key] else value
    return base


def cmd_generate(args: argparse.Namespace) -> None:
    """Complete prompts with a run's latest checkpoint or a Hugging Face directory."""
    check_paths(args)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if args.hf:
        samples = hf.generate_text(args.hf, args.prompt, **options)
    else:
        run, model, params = load_run(args.work_dir)
        tokenizer = load_tokenizer(run.data.tokenizer)
        samples = complete(model, params, tokenizer, args.prompt, **options)
    _print_samples(args.prompt, samples)


def cmd_convert(args: argparse.Namespace) -> None:
    """Hugging Face directory <-> jaxstack checkpoint."""
    check_paths(args)
    with long_step(f"converting {args.source} to {args.dest} ({args.to} format)"):
        if args.to == "jaxstack":
            hf.convert_to_checkpoint(args.source, args.dest)
        else:
            saved = Path(args.source) / RUN_FILE
            run = RunConfig.load(args.source) if saved.exists() else None
            if run is not None and run.lora.enabled:  # a LoRA run: its base merged with it
                export_hf(run, load_run(args.source)[2], args.dest, dtype=args.dtype)
            else:
                config = run.model if run is not None else None
                hf.convert_to_hf(args.source, args.dest, config, dtype=args.dtype)
    print(f"wrote {args.dest}")


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve a run's checkpoint or a Hugging Face directory over an OpenAI-compatible API."""
    from jaxstack.serve.metrics import SERVE_EXTRA  # the engine needs no web package

    config = serve_config(args)  # bad flags fail before the model loads
    options = _engine_options(args)
    if args.dry_run:  # config.json is all it reads
        print(_serving_plan(args, options))
        return
    try:
        from jaxstack.serve.server import serve
    except ImportError as error:  # the web packages are an extra
        raise ModuleNotFoundError(
            f"jaxstack serve needs the {error.name or 'web server'} package, which comes with "
            f"the serve extra: {SERVE_EXTRA}",
            name=error.name,
        ) from error
    check_paths(args)
    from jaxstack.serve import LLM

    _say_xla_flags(args)
    cache = use_compilation_cache(args.compilation_cache)
    print(f"XLA compilation cache: {cache or 'off'}", flush=True)
    mesh = None
    if args.tensor > 1:
        mesh = make_mesh(data=1, tensor=args.tensor, devices=jax.devices()[: args.tensor])
    source = {"hf": args.hf} if args.hf else {"work_dir": args.work_dir}
    llm = LLM(**source, mesh=mesh, dtype=args.dtype, attention_sinks=args.attention_sinks,
              quantize=args.quantize, **options)  # fmt: skip
    print(f"serving {llm.name} on http://{args.host}:{args.port}/v1", flush=True)
    try:
        serve(llm, args.host, args.port, config=config)
    finally:
        llm.close()


def use_compilation_cache(setting: str | None) -> str | None:
    """Turn on jax's persistent compilation cache, so a restart loads the serving buckets
    instead of compiling them: ``setting`` is a directory, ``off``, or None for
    ``$JAX_COMPILATION_CACHE_DIR`` when set, else ``jaxstack/xla`` in the user's cache
    directory (``$XDG_CACHE_HOME``, default ``~/.cache``). Returns the directory (None: off)."""
    if setting == "off":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    directory = setting or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if directory is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        directory = os.path.join(base, "jaxstack", "xla")
    directory = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # every bucket
    return directory


def _engine_options(args: argparse.Namespace) -> dict:
    """``EngineConfig`` fields from the serve flags."""
    buckets = lambda text: tuple(int(n) for n in text.split(","))  # noqa: E731
    options = dict(page_size=args.page_size, num_pages=args.num_pages, max_queue=args.max_queue)
    options["memory_fraction"] = args.memory_fraction
    options.update(max_model_len=args.max_model_len, prefix_caching=not args.no_prefix_caching)
    if args.token_buckets:
        options["token_buckets"] = buckets(args.token_buckets)
    if args.seq_buckets:
        options["seq_buckets"] = buckets(args.seq_buckets)
    return options


def _serving_plan(args: argparse.Namespace, options: dict) -> str:
    """``serve --dry-run``: per-device bytes of the model and KV cache, nothing loaded."""
    from jaxstack.serve import EngineConfig
    from jaxstack.serve.llm import hf_serving_dtype, resolve_dtype
    from jaxstack.serve.plan import plan_serving

    if args.hf:
        hf_config = hf.read_hf_config(args.hf)
        config = hf.config_from_hf(hf_config)
        dtype = hf_serving_dtype(hf_config, args.dtype)
    else:
        config = RunConfig.load(args.work_dir).model
        dtype = resolve_dtype(args.dtype, None, config.dtype)
    config = dataclasses.replace(config, dtype=dtype)
    return str(plan_serving(config, tensor=args.tensor, engine=EngineConfig(**options)))


def serve_config(args: argparse.Namespace) -> "ServerConfig":
    """The HTTP server's keys and limits from ``jaxstack serve`` flags (keys: ``--api-key``,
    else the ``JAXSTACK_API_KEY`` environment variable)."""
    from jaxstack.serve.server_config import ServerConfig, api_keys_from

    return ServerConfig(
        api_keys=api_keys_from(args.api_key),
        protect_metrics=args.protect_metrics,
        max_body_bytes=round(args.max_body_mb * 2**20),
        max_streams=args.max_streams,
        stream_timeout_s=args.stream_timeout,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of the ``jaxstack`` command."""
    parser = argparse.ArgumentParser(prog="jaxstack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a tiny model on stdlib sources and sample from it")
    demo.add_argument("--steps", type=int, default=300, help="optimizer updates (default 300)")
    demo.add_argument("--work-dir", help="where to keep the run (default: a new temp dir)")

    base = field_names(RunConfig())
    moe = [key for key in field_names(RunConfig(model=preset("tiny-moe"))) if key not in base]
    keys = ", ".join(base) + "; with a mixture-of-experts --model also: " + ", ".join(moe)
    presets = ", ".join(PRESETS)
    tr = sub.add_parser(
        "train",
        help="train a run: --config FILE.json and/or --section.key value overrides",
        epilog=f"override keys: {keys}",
    )
    tr.add_argument("--model", help=f"start from a model preset: {presets}")
    tr.add_argument("--config", help="JSON file with (part of) a RunConfig")
    tr.add_argument("--print-config", action="store_true", help="print the resolved config")
    choice = tr.add_mutually_exclusive_group()
    choice.add_argument(
        "--resume",
        action="store_true",
        help="resume the work dir's checkpoint even though the data config changed",
    )
    choice.add_argument(
        "--overwrite",
        action="store_true",
        help="move the work dir's previous run aside and start afresh",
    )

    pl = sub.add_parser(
        "plan",
        help="print each parameter's sharding and the memory per device, allocating nothing",
        epilog=f"override keys: {keys}",
    )
    pl.add_argument("--model", help=f"start from a model preset: {presets}")
    pl.add_argument("--config", help="JSON file with (part of) a RunConfig")
    pl.add_argument("--devices", type=int, help="plan for this many devices (default: local)")
    pl.add_argument("--device-memory-gb", type=float, help="memory per device for mesh=auto")

    gen = sub.add_parser("generate", help="complete prompts from a run's checkpoint")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--work-dir", help="work dir of a train/demo run")
    source.add_argument("--hf", help="a local Hugging Face model directory")
    gen.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0)

    conv = sub.add_parser("convert", help="Hugging Face directory <-> jaxstack checkpoint")
    conv.add_argument("--to", choices=["jaxstack", "hf"], required=True, help="target format")
    conv.add_argument("source", help="HF directory (--to jaxstack) or run work dir (--to hf)")
    conv.add_argument("dest", help="work dir to create (--to jaxstack) or HF directory (--to hf)")
    conv.add_argument("--dtype", help="tensor dtype of an HF export (default float32)")
    srv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    source = srv.add_mutually_exclusive_group(required=True)
    source.add_argument("--work-dir", help="work dir of a train/demo run")
    source.add_argument("--hf", help="a local Hugging Face model directory")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--tensor", type=int, default=1, help="tensor-parallel devices")
    srv.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    srv.add_argument(
        "--num-pages",
        type=int,
        help="KV pages per layer (default: sized by --memory-fraction)",
    )
    srv.add_argument(
        "--memory-fraction",
        type=float,
        default=0.9,
        help="share of each device's memory (on CPU: of the available host memory) the "
        "weights and KV cache may take (default 0.9)",
    )
    srv.add_argument(
        "--compilation-cache",
        help="directory of the persistent XLA compilation cache, or 'off' (default: "
        "$JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/jaxstack/xla)",
    )
    srv.add_argument("--max-model-len", type=int, help="longest prompt + output")
    srv.add_argument("--max-queue", type=int, default=1024, help="waiting requests before 429")
    srv.add_argument("--token-buckets", help="tokens per step to compile, e.g. 16,64,256")
    srv.add_argument("--seq-buckets", help="sequences per step to compile, e.g. 4,16,64")
    srv.add_argument("--no-prefix-caching", action="store_true")
    srv.add_argument(
        "--api-key",
        action="append",
        help="require 'Authorization: Bearer KEY' on /v1 (repeatable); to keep keys out of "
        "process listings set JAXSTACK_API_KEY=KEY1,KEY2 instead",
    )
    srv.add_argument(
        "--protect-metrics", action="store_true", help="require the API key on /metrics too"
    )
    srv.add_argument(
        "--max-body-mb", type=float, default=4.0, help="largest request body (default 4)"
    )
    srv.add_argument(
        "--max-streams", type=int, default=256, help="streamed responses at once before 429"
    )
    srv.add_argument(
        "--stream-timeout",
        type=float,
        default=30.0,
        help="seconds a streaming client may read nothing before its request is cancelled",
    )
    srv.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="weights, KV cache and compute (auto: the checkpoint's torch_dtype, else bfloat16 "
        "on GPU/TPU)",
    )
    srv.add_argument(
        "--attention-sinks",
        type=int,
        default=0,
        metavar="N",
        help="keep the first N tokens visible past a sliding-window model's window "
        "(StreamingLLM); needs a model with a sliding window",
    )
    srv.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: matmul weights in int8 with per-output-channel scales (a quarter of "
        "float32's bytes per decode step; one device)",
    )
    srv.add_argument(
        "--dry-run",
        action="store_true",
        help="print the per-device plan (weights, KV cache) without loading anything",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxstack`` console script."""
    absl.logging.set_verbosity(absl.logging.ERROR)  # orbax's info/warning chatter
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "plan"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("demo", "train", "serve"):  # before any computation starts XLA
        args.xla_flags = apply_xla_flags().describe()  # said once the run starts
    try:
        if args.command == "demo":
            cmd_demo(args)
        elif args.command == "train":
            cmd_train(args, extra)
        elif args.command == "plan":
            cmd_plan(args, extra)
        elif args.command == "convert":
            cmd_convert(args)
        elif args.command == "serve":
            cmd_serve(args)
        else:
            cmd_generate(args)
    except (ValueError, KeyError, FileNotFoundError, TypeError, ModuleNotFoundError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"jaxstack: error: {message}", file=sys.stderr)
        return 2
    except RUN_FAILURES as error:
        where = f" (traceback in {ERROR_LOG} of the work dir)" if args.command == "train" else ""
        print(f"jaxstack: error: {error}{where}", file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    """The console script: ``main``, then an immediate exit when a run failed, so that
    background threads of a failed checkpoint save cannot keep the process alive."""
    code = main()
    if code == 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
