"""Implementations of the `medfed` subcommands (each a few lines over library functions)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.settings import default_keys_path


def _signing_key(path: Path | None):  # type: ignore[no-untyped-def]
    from common.signing import load_or_create_signing_key, public_key_path

    path = path or default_keys_path()
    key, created = load_or_create_signing_key(path)
    if created:
        print(f"created bundle-signing key {path} (public key: {public_key_path(path)})")
    return key


def with_device(args: argparse.Namespace) -> list[str]:
    """The command's config overrides, with `--device X` as a last `device=X`."""
    overrides = list(args.overrides)
    if args.device is not None:
        overrides.append(f"device={args.device}")
    return overrides


def cmd_pretrain(args: argparse.Namespace) -> int:
    """`medfed pretrain`."""
    from common.config_check import load_config
    from common.pretrain import load_source, pretrain

    cfg = load_config(args.config, with_device(args))
    if args.out.exists() and not args.force:
        raise FileExistsError(f"bundle directory {args.out} exists; pass --force to replace it")
    if args.out.exists():
        _replaceable_bundle(args.out, [args.config, args.keys or default_keys_path()])
    data = load_source(cfg)  # bad data stops here, before a key or a file is created
    key = _signing_key(args.keys)
    manifest = pretrain(cfg, args.out, key, replace=args.force, data=data)
    val = manifest["metrics"]["source-validation"]
    print(
        f"wrote bundle {args.out} ({manifest['source']}): source validation balanced "
        f"accuracy {_fmt(val.get('balanced_accuracy'))}, AUC {_fmt(val.get('auc'))} "
        f"({val.get('n')} rows)"
    )
    return 0


def _replaceable_bundle(out: Path, inputs: list[Path]) -> None:
    """`--force` replaces a bundle, nothing else: `--out $MEDFED_HOME` wiped the signing key
    and the config with it (every bundle signed before could no longer be verified)."""
    if not out.is_dir() or not (out / "manifest.json").is_file():
        raise FileExistsError(f"{out} exists and is not a bundle directory (no manifest.json); "
                              "--force replaces only a bundle: choose another --out")
    where = out.resolve()
    for path in inputs:
        if path.resolve() == where or where in path.resolve().parents:
            raise FileExistsError(f"{out} holds {path}, an input of this command: replacing "
                                  "it would delete that file; choose another --out")


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def cmd_simulate(args: argparse.Namespace) -> int:
    """`medfed simulate`."""
    from common.config import ConfigError
    from common.config_check import load_config
    from server.simulate import SimulateRequest, simulate

    overrides = with_device(args)
    if args.partition is not None:
        overrides.append(f"federation.data.partition={args.partition}")
    if args.hospitals is not None:
        if args.hospitals < 1:
            raise ConfigError(f"--hospitals must be at least 1, got {args.hospitals}")
        data = load_config(args.config, overrides).federation.data
        if data.partition == "natural" and data.source == "synthetic":
            overrides.append(f"federation.data.synthetic_sites={args.hospitals}")
        elif data.partition == "natural":
            raise ConfigError(
                f"--hospitals {args.hospitals} needs a partition that re-splits the data "
                f"(--partition iid|dirichlet:A|quantity:A): with 'natural' the {data.source} "
                "source has a fixed number of sites")
        else:
            overrides.append(f"federation.data.num_sites={args.hospitals}")
        overrides.append(f"federation.strategy.min_nodes={min(args.hospitals, 2)}")
    if args.rounds is not None:
        overrides.append(f"federation.rounds={args.rounds}")
    keys = args.keys or default_keys_path()
    request = SimulateRequest(
        config_path=args.config,
        overrides=tuple(overrides),
        bundle=args.bundle,
        run_dir=args.out,
        keys=keys,
        resume=args.resume,
        cpus_per_client=args.cpus_per_client,
        gpus_per_client=args.gpus_per_client,
        verbose=args.verbose,
        runtime_start_timeout=args.runtime_start_timeout,
    )
    return simulate(request)


def cmd_predict(args: argparse.Namespace) -> int:
    """`medfed predict`."""
    from client.predict import predict

    summary = predict(args.model, args.data, args.out, args.public_key, args.device,
                      args.site_stats, certs=args.certs, unsigned=args.unsigned)
    counts = ", ".join(f"{name}: {n}" for name, n in summary["counts"].items())
    who = f"site model of {summary['site']}" if summary["site"] else "global model"
    print(f"wrote {args.out}: {summary['rows']} rows predicted with {who} v{summary['version']} "
          f"at threshold {summary['operating_point']['threshold']:.3f} ({counts}); "
          f"statistics: {summary['statistics']}")
    return 0


MAX_BOOTSTRAP = 100_000  # resamples; 1,000 (the default) already gives stable 95% intervals


def cmd_evaluate(args: argparse.Namespace) -> int:
    """`medfed evaluate`."""
    from client.evaluate import evaluate_file, format_report, report_paths, write_report
    from client.predict import refuse_replacing_inputs

    # the time grows with resamples x rows (memory does not: resamples come in blocks)
    if not 1 <= args.bootstrap <= MAX_BOOTSTRAP:
        raise ValueError(f"--bootstrap must be in 1..{MAX_BOOTSTRAP}, got {args.bootstrap}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in 0..{2**32 - 1}, got {args.seed}")
    if args.out is not None:
        refuse_replacing_inputs(report_paths(args.out), args.model, args.data, args.site_stats)
    report, y, proba = evaluate_file(args.model, args.data, args.site_stats, args.public_key,
                                     certs=args.certs, unsigned=args.unsigned, seed=args.seed,
                                     samples=args.bootstrap)
    print(format_report(report))
    if args.out is not None:
        written = write_report(report, y, proba, args.out)
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """`medfed schema`."""
    from common.atomic import atomic_write_text, refuse_replacing_input
    from common.data.schema_draft import draft_schema

    refuse_replacing_input([args.out], args.data)
    if args.out.exists() and not args.force:
        raise FileExistsError(f"{args.out} exists; pass --force to replace it")
    draft = draft_schema(list(args.data), args.label, tuple(args.ignore))
    print("inferred:")
    for line in draft.inferred:
        print(f"  {line}")
    print("needs a decision:" if draft.decisions else "needs a decision: nothing")
    for line in draft.decisions:
        print(f"  - {line}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, draft.to_yaml())
    print(f"wrote {args.out}: review it, then point data.csv_schema at it")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    """`medfed check-data`."""
    import sys

    from client.check_data import check_data

    result = check_data(args.model, args.data, args.purpose, args.public_key,
                        certs=args.certs, unsigned=args.unsigned, test_data=args.test_data)
    for warning in result.warnings:
        print(f"medfed: warning: {args.data}: {warning}", file=sys.stderr)
    print(result.summary())
    return 0


def cmd_model_card(args: argparse.Namespace) -> int:
    """`medfed model-card`."""
    from client.model_card import model_card

    print(model_card(args.model, args.public_key, certs=args.certs, unsigned=args.unsigned),
          end="")
    return 0


def cmd_certs_init(args: argparse.Namespace) -> int:
    """`medfed certs init`."""
    from common.certs import init_federation

    paths = init_federation(args.out, args.server_names, args.server_ips, force=args.force)
    print(f"federation CA:       {paths.ca_cert} (key {paths.ca_key}, keep it offline)")
    print(f"server certificate:  {paths.server_cert} (key {paths.server_key})")
    print(f"bundle signing key:  {paths.signing_key} (public key {paths.signing_pub}: "
          "give it to every hospital)")
    return 0


def cmd_certs_hospital(args: argparse.Namespace) -> int:
    """`medfed certs hospital`."""
    from common.certs import init_hospital

    ca_dir = args.ca or args.out.parent
    paths = init_hospital(args.name, args.out, ca_dir, force=args.force)
    print(f"hospital {args.name}: node key {paths.node_key}, client certificate "
          f"{paths.client_cert}")
    print(f"register it at the server: add {{name: {args.name}, public_key: {paths.node_pub}}} "
          "to hospitals.yaml")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """`medfed pull`."""
    from client.pull import pull_from_registry, pull_from_server

    if args.registry is not None:
        manifest = pull_from_registry(args.registry, args.version, args.out, args.public_key,
                                      replace=args.force, unsigned=args.unsigned)
    else:
        manifest = pull_from_server(args.server, args.certs, args.version, args.out,
                                    args.public_key, replace=args.force)
    # --unsigned applies to --registry only: a pull from a server always checks the signature
    skipped = args.unsigned and args.registry is not None
    checked = "hashes verified, signature NOT checked" if skipped else \
        "hashes and signature verified"
    print(f"pulled model v{manifest['version']:04d} (round {manifest['round']}) into {args.out}; "
          f"{checked}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    """`medfed server`."""
    from console.app import create_app
    from server.deploy import CONSOLE_PATH, ServerRequest, run_server

    def console(run_dir: Path, public_key: Path):  # type: ignore[no-untyped-def]
        return create_app(run_dir, public_key, prefix=CONSOLE_PATH)

    return run_server(ServerRequest.from_args(args), console)


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """`medfed healthcheck`."""
    from server.health import check_health

    problem = check_health(args.host, args.port, args.run_dir)
    if problem:
        print(f"medfed: unhealthy: {problem}", file=sys.stderr)
        return 1
    print("ok")
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    """`medfed client`."""
    from client.deploy import ClientRequest, run_client

    return run_client(ClientRequest.from_args(args))


def cmd_export_heart(args: argparse.Namespace) -> int:
    """`medfed export-heart`."""
    from common.data.heart import SITE_FILES, export_site_csv

    for site in SITE_FILES:
        path = args.out / f"{site}.csv"
        test = args.test_dir / f"{site}.csv" if args.test_dir is not None else None
        rows = export_site_csv(site, path, args.protocol, test)
        print(f"wrote {path}" + (f" and {test}" if test else "") + f" ({rows} rows)")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    """`medfed console`: serve the console over a directory of runs until Ctrl-C."""
    import uvicorn

    from common.config import show
    from common.processes import bind_problem, interrupt_on_sigterm
    from console.app import create_app

    if not args.runs.is_dir():
        raise FileNotFoundError(f"--runs {args.runs} is not a directory")
    if args.public_key is not None and not args.public_key.is_file():
        raise FileNotFoundError(f"--public-key {args.public_key} does not exist")
    problem = bind_problem(args.host, args.port)
    if problem is not None:
        raise ValueError(f"port {args.port} on {show(args.host)} (--port) {problem}"
                         f"{'; choose another --port' if problem == 'is in use' else ''}")
    app = create_app(args.runs, args.public_key)
    print(f"medfed console on http://{args.host}:{args.port}/ over {args.runs} (Ctrl-C to stop)",
          flush=True)
    interrupt_on_sigterm()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", server_header=False)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """`medfed report`."""
    from common.atomic import refuse_replacing_input
    from console.report import write_report

    refuse_replacing_input([args.out], [])
    out = write_report(args.run_dir, args.out)
    print(f"report written to {out}")
    return 0
