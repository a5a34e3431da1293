"""`python -m mirror.serve` (= `mirror serve`): load a model and serve it over gRPC.

The server takes an Engine; this entry point builds the in-process LocalEngine. Another
runtime (e.g. a distributed engine from a deployment config) plugs in by building a different
Engine in `build_engine` - the server and the API stay the same.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from .cli import add_model_args, add_spec_args

    p.add_argument("--config", default=None, metavar="YAML",
                   help="deployment config (deploy/*.yaml): serve through the distributed runtime - Ray "
                        "actors for the target and draft, the gRPC token channel. Without it the model "
                        "runs in this process.")
    p.add_argument("--host", default=None, help="address to bind (default: the config's, else loopback)")
    p.add_argument("--port", type=int, default=None, help="port (0 = pick a free one; default 50051)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_model_args(p)
    p.add_argument("--target-backend", default=None, choices=["auto", "torch", "onnx"],
                   help="how the target runs without --config (with it: the config's target.backend): onnx = "
                        "ONNX Runtime graphs (fp32 CPU), torch = eager PyTorch, auto (default) = onnx where "
                        "it applies and ONNX Runtime is installed")
    add_spec_args(p)  # --method etc.: the defaults for requests that name none (else deploy/local.yaml's)


def build_engine(args):
    from .cli import inprocess_backend, load_from_args, spec_from_args, with_target_backend

    if args.config:
        from .cli import deployment_from_args
        from .runtime.cluster import DistributedEngine

        deploy = deployment_from_args(args)
        args.host = args.host or deploy.server.host
        args.port = deploy.server.port if args.port is None else args.port
        return DistributedEngine(deploy)
    from .engine import LocalEngine

    from .runtime.config import DeploymentConfig

    # requests that name no method or setting get the embedded default's speculative settings
    # (deploy/local.yaml: Mirror-SD, n-gram + gguf draft, trained exit head), as `mirror
    # generate` does; flags override them
    base = DeploymentConfig.local()
    if args.model:
        base = base.with_model(args.model)  # the bundled model's artifacts do not fit another
    spec = spec_from_args(args, base.speculative)
    backend, auto = inprocess_backend(args)
    lm = with_target_backend(load_from_args(args), spec, backend, auto)
    logging.getLogger("mirror.serve").info("target backend: %s", getattr(lm.model, "backend", "torch"))
    return LocalEngine(lm.model, lm.tokenizer, spec)


def run(args) -> int:
    from .server import serve

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = build_engine(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"mirror: error: {e}", file=sys.stderr)
        return 2
    args.host = args.host or "127.0.0.1"
    args.port = 50051 if args.port is None else args.port
    try:
        asyncio.run(serve(engine, args.host, args.port))
    except OSError as e:
        print(f"mirror: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mirror.serve", description="Serve a model over gRPC")
    add_serve_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
