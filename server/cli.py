"""`loraplex` command line: serve | generate | bench | train | fetch-model | loadtest.

Argument parsing lives here; each command hands a validated config to the module that
does the work. Logs go to stderr; `generate` prints only the completion on stdout.
Every `serve` flag can also be set by an environment variable LORAPLEX_<FLAG>
(e.g. LORAPLEX_MAX_LORAS=16).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys

import server  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
from server.config import ConfigError, EngineConfig
from server.errors import LoraplexError


def _env(flag: str, default):
    """Default for --flag from LORAPLEX_FLAG, converted to the default's type."""
    raw = os.environ.get("LORAPLEX_" + flag.upper().replace("-", "_"))
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    p.add_argument("--model", default=_env("model", d.model), help="HF folder, .gguf file, or 'default'")
    p.add_argument("--quantization", default=_env("quantization", d.quantization), choices=["nf4", "none"])
    p.add_argument("--dtype", default=_env("dtype", d.dtype))
    p.add_argument("--device", default=_env("device", d.device))
    p.add_argument("--adapters-dir", default=_env("adapters-dir", d.adapters_dir))
    p.add_argument("--max-loras", type=int, default=_env("max-loras", d.max_loras))
    p.add_argument("--max-lora-rank", type=int, default=_env("max-lora-rank", d.max_lora_rank))
    p.add_argument("--max-cpu-loras", type=int, default=_env("max-cpu-loras", d.max_cpu_loras))
    p.add_argument("--max-num-seqs", type=int, default=_env("max-num-seqs", d.max_num_seqs))
    p.add_argument("--max-num-batched-tokens", type=int,
                   default=_env("max-num-batched-tokens", d.max_num_batched_tokens))
    p.add_argument("--kv-cache-tokens", type=int, default=_env("kv-cache-tokens", d.kv_cache_tokens))
    p.add_argument("--max-model-len", type=int, default=_env("max-model-len", d.max_model_len))
    p.add_argument("--lm-head-dtype", default=_env("lm-head-dtype", d.lm_head_dtype),
                   choices=["auto", "float32", "bfloat16"],
                   help="LM head weights: auto = bfloat16 for NF4 where the CPU kernels run")
    p.add_argument("--lora-dtype", default=_env("lora-dtype", d.lora_dtype),
                   choices=["auto", "float32", "bfloat16"],
                   help="adapter weights held as: auto = bfloat16 for NF4 where the CPU kernels run")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=_env("enable-prefix-caching", d.enable_prefix_caching),
                   help="reuse the KV blocks of prompt prefixes seen before (keyed by adapter and tenant)")
    p.add_argument("--prefix-cache-blocks", type=int, default=_env("prefix-cache-blocks", d.prefix_cache_blocks),
                   help="most cached KV blocks kept while no request uses them (0 = as the pool allows)")
    p.add_argument("--compile", default=_env("compile", d.compile), choices=["auto", "on", "off"],
                   help="decode steps with torch.compile'd layers, compiled at start-up; auto: on for CUDA only")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, quantization=args.quantization, dtype=args.dtype, device=args.device,
        adapters_dir=args.adapters_dir, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_tokens=args.kv_cache_tokens,
        max_model_len=args.max_model_len, lm_head_dtype=args.lm_head_dtype, lora_dtype=args.lora_dtype,
        enable_prefix_caching=args.enable_prefix_caching, prefix_cache_blocks=args.prefix_cache_blocks,
        compile=args.compile,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch-model", help="fetch and convert the embedded default model")
    p.set_defaults(func=_cmd_fetch_model)

    p = sub.add_parser("generate", help="one completion on stdout")
    _add_engine_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="use the prompt as is (no chat template)")
    p.add_argument("--adapter", default=None, help="adapter name in --adapters-dir")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("bench", help="offline throughput benchmark")
    _add_engine_args(p)
    p.add_argument("--prompts", type=int, default=32, help="prompts per batch size")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--adapters", type=int, default=0, help="distinct random adapters, round-robin")
    p.add_argument("--out", default="bench.json")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    _add_engine_args(p)
    p.add_argument("--host", default=_env("host", "127.0.0.1"))
    p.add_argument("--port", type=int, default=_env("port", 8000))
    p.add_argument("--api-keys", default=_env("api-keys", ""))
    p.add_argument("--max-queue", type=int, default=_env("max-queue", 256))
    p.add_argument("--drain-timeout", type=float, default=_env("drain-timeout", 30.0))
    p.add_argument("--max-request-bytes", type=int, default=_env("max-request-bytes", 4 * 2**20),
                   help="request bodies larger than this get 413 before they are parsed (default 4 MiB)")
    p.add_argument("--request-timeout", type=float, default=_env("request-timeout", 0.0),
                   help="seconds a generation request may run before it is ended with an error (0: no limit)")
    p.add_argument("--replicas", type=int, default=_env("replicas", 0),
                   help="engine replicas on Ray Serve, behind one API (needs loraplex[ray]; 0: one server, no Ray)")
    p.add_argument("--ray-address", default=_env("ray-address", ""),
                   help="with --replicas: join this Ray cluster instead of starting one on 127.0.0.1")
    p.add_argument("--models-per-replica", type=int, default=_env("models-per-replica", 0),
                   help="with --replicas: adapter ids Serve routes by per replica (0: --max-loras)")
    p.add_argument("--ray-metrics-port", type=int, default=_env("ray-metrics-port", 0),
                   help="with --replicas: the port of Ray's Prometheus export of per-replica metrics (0: any)")
    p.set_defaults(func=_cmd_serve)

    # train and loadtest parse their own flags: prefix_chars="\0" passes every argument through
    p = sub.add_parser("train", help="QLoRA fine-tuning that writes a PEFT adapter",
                       prefix_chars="\0", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("loadtest", help="scenario load test against an OpenAI-compatible endpoint",
                       prefix_chars="\0", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_loadtest)
    return parser


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    from server.model.default import ensure_default_model
    print(ensure_default_model())
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from server.engine.offline import GenerateArgs, generate_cli
    return generate_cli(engine_config(args), GenerateArgs(args.prompt, args.raw, args.adapter, args.max_tokens,
                                                          args.temperature, args.seed))


def _cmd_bench(args: argparse.Namespace) -> int:
    from bench.engine import BenchArgs, run_bench
    return run_bench(engine_config(args), BenchArgs(args.prompts, args.batch_sizes, args.max_tokens, args.adapters,
                                                    args.out))


def _cmd_serve(args: argparse.Namespace) -> int:
    from server.api.app import serve
    from server.config import ServerConfig
    cfg = ServerConfig(engine=engine_config(args), host=args.host, port=args.port,
                       api_keys=args.api_keys, max_queue=args.max_queue, drain_timeout=args.drain_timeout,
                       max_request_bytes=args.max_request_bytes, request_timeout=args.request_timeout)
    if args.replicas or args.ray_address:
        from server.deploy.ray_config import RayAppConfig
        app = RayAppConfig(server=cfg, replicas=args.replicas or 1, ray_address=args.ray_address,
                           metrics_port=args.ray_metrics_port, models_per_replica=args.models_per_replica)
        if importlib.util.find_spec("ray") is None:
            raise ConfigError("--replicas needs Ray Serve: pip install 'loraplex[ray]'")
        from server.deploy.launch import serve_ray
        return serve_ray(app)
    return serve(cfg)


def _cmd_train(args: argparse.Namespace) -> int:
    from server.train.trainer import main as train_main
    return train_main(args.rest)


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from loadtest.cli import main as loadtest_main
    return loadtest_main(args.rest)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LORAPLEX_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, LoraplexError) as e:
        print(f"loraplex: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
