"""`medfed` command line: a thin layer over `common/`, `server/`, `client/` and Flower's own
processes. Every subcommand has `--help` with an example; bad input ends with one sentence on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="experiment YAML (configs/*.yaml)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set federation.rounds=3 (repeatable)",
    )


def _add_keys_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keys", type=Path, default=None,
        help="Ed25519 bundle-signing key (created if missing; default $MEDFED_HOME/signing.key, "
        "MEDFED_HOME defaults to ~/.medfed)",
    )


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="auto | cpu | cuda | cuda:N | mps (the same as --set device=DEVICE)")


def _number(accept: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """An argparse type: a number `accept` takes, else "must be <what>, got '<text>'"."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")  # refused below like any number out of range
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


_gpu_share = _number(lambda v: 0 <= v <= 1, "a share of one GPU in 0..1")
_positive_seconds = _number(lambda v: v > 0, "a number of seconds above 0")


def _example(text: str) -> str:
    return f"example:\n  {text}"


def _add_trust_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--public-key", type=Path, default=None,
                   help="the federation's signing.pub (default: signing.pub in --certs, else "
                   "$MEDFED_HOME/signing.pub)")
    p.add_argument("--certs", type=Path, default=None,
                   help="the hospital's certificate folder (holds signing.pub)")
    p.add_argument("--unsigned", action="store_true",
                   help="run a bundle whose signature is not checked (prints a warning)")


def build_parser() -> argparse.ArgumentParser:
    """The whole `medfed` command tree."""
    from medfed import commands as c

    parser = argparse.ArgumentParser(
        prog="medfed",
        description="Federated transfer learning for hospitals on Flower.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_example("medfed pretrain --config configs/heart.yaml --out runs/heart-pretrain"),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's own logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str, example: str
            ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help_, description=help_, epilog=_example(example),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        return p

    p = add("pretrain", c.cmd_pretrain, "train backbone + head centrally and write a signed bundle",
            "medfed pretrain --config configs/heart.yaml --out runs/heart-pretrain")
    _add_config_args(p)
    _add_device_arg(p)
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    _add_keys_arg(p)

    p = add("simulate", c.cmd_simulate,
            "run the federated apps on Flower's simulation runtime (N hospitals, one machine)",
            "medfed simulate --config configs/heart.yaml --bundle runs/heart-pretrain "
            "--out runs/heart-sim")
    _add_config_args(p)
    _add_device_arg(p)
    p.add_argument("--bundle", type=Path, required=True, help="pretrained bundle directory")
    p.add_argument("--out", type=Path, required=True, help="run directory to write")
    p.add_argument("--hospitals", type=int, default=None, help="number of simulated hospitals")
    p.add_argument("--partition", default=None,
                   help="natural | iid | dirichlet:ALPHA | quantity:ALPHA")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--cpus-per-client", type=float, default=1.0,
                   help="CPU cores reserved per simulated ClientApp (default 1)")
    p.add_argument("--gpus-per-client", type=_gpu_share, default=None, metavar="SHARE",
                   help="share of a GPU reserved per simulated ClientApp, 0-1 (default: 0 "
                        "on CPU; on a GPU an equal share for each ClientApp that runs at once)")
    p.add_argument("--runtime-start-timeout", type=_positive_seconds, default=120.0,
                   metavar="SECONDS",
                   help="give up when Flower's simulation runtime (Ray) has not started "
                        "within this time (default 120)")
    _add_keys_arg(p)

    p = sub.add_parser(
        "certs", help="create federation certificates and hospital keys",
        description="create federation certificates and hospital keys",
        epilog=_example("medfed certs init --out certs --server-name fl.hospital-net.org"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    certs = p.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    pi = certs.add_parser(
        "init", help="federation CA, server certificate and bundle-signing key",
        epilog=_example("medfed certs init --out certs --server-name fl.example.org "
                        "--server-ip 10.0.0.5"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    pi.set_defaults(func=c.cmd_certs_init)
    pi.add_argument("--out", type=Path, required=True)
    pi.add_argument("--server-name", action="append", required=True, dest="server_names")
    pi.add_argument("--server-ip", action="append", default=[], dest="server_ips")
    pi.add_argument("--force", action="store_true", help="overwrite existing files")
    ph = certs.add_parser(
        "hospital", help="a hospital's node key pair and client certificate",
        epilog=_example("medfed certs hospital --name hospital-a --out certs/hospitals --ca certs"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ph.set_defaults(func=c.cmd_certs_hospital)
    ph.add_argument("--name", required=True)
    ph.add_argument("--out", type=Path, required=True)
    ph.add_argument("--ca", type=Path, default=None, help="directory of `certs init` "
                    "(default: the parent of --out)")
    ph.add_argument("--force", action="store_true")

    p = add("server", c.cmd_server,
            "start the aggregation server (Flower SuperLink, TLS, registered hospitals only)",
            "medfed server --config configs/heart.yaml --certs certs --bundle runs/heart-pretrain "
            "--hospitals hospitals.yaml")
    _add_config_args(p)
    p.add_argument("--bundle", type=Path, required=True, help="pretrained bundle directory")
    p.add_argument("--certs", type=Path, default=None, help="directory of `medfed certs init`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--registry-port", type=int, default=8443)
    p.add_argument("--hospitals", type=Path, default=None,
                   help="YAML list of {name, public_key} to register")
    p.add_argument("--run-dir", type=Path, default=Path("runs/server"))
    p.add_argument("--insecure", action="store_true", help="no TLS, no node auth (dev only)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    p.add_argument("--exit-after-run", action="store_true",
                   help="stop once the run has finished instead of serving the registry")
    p.add_argument("--health-port", type=int, default=0,
                   help="serve the SuperLink's gRPC health check on this port (for container "
                   "healthchecks: `medfed healthcheck`)")

    p = add("healthcheck", c.cmd_healthcheck,
            "exit 0 when a medfed server is up and its hospitals are registered (for Docker)",
            "medfed healthcheck --port 8081 --run-dir /runs/server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="the server's --health-port")
    p.add_argument("--run-dir", type=Path, required=True, help="the server's --run-dir")

    p = add("client", c.cmd_client, "run a hospital's Flower SuperNode with its key and data",
            "medfed client --server fl.example.org:8000 --data /data/heart.csv "
            "--certs certs/hospitals/hospital-a --name hospital-a")
    p.add_argument("--server", required=True, help="HOST:PORT of the SuperLink")
    p.add_argument("--data", type=Path, required=True, help="the hospital's CSV or npz")
    p.add_argument("--test-data", type=Path, default=None,
                   help="the hospital's own test file, kept apart (only reported, never "
                   "trained on); default: carved from --data")
    p.add_argument("--certs", type=Path, default=None, help="directory of `medfed certs hospital`")
    p.add_argument("--name", required=True, help="hospital name (site id)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--workdir", type=Path, default=None,
                   help="cache and model directory (default ~/.medfed/<name>)")
    p.add_argument("--port", type=int, default=0,
                   help="local port for the SuperNode's ClientApps (default: a free one, so "
                   "several hospitals can share a host)")
    p.add_argument("--model", type=Path, default=None,
                   help="a bundle (e.g. the pretrained one) to check --data against before "
                   "joining, as `medfed check-data` does")
    p.add_argument("--wait-registration", type=float, default=600.0, metavar="SECONDS",
                   help="while the server does not know this hospital's key, try again with "
                   "backoff for this long (default 600)")
    p.add_argument("--give-up-after", type=float, default=600.0, metavar="SECONDS",
                   help="stop when the server cannot be reached for this long (default 600; "
                   "0: keep trying)")
    p.add_argument("--max-retries", type=int, default=0,
                   help="also give up after N failed connection attempts (default: no limit)")
    p.add_argument("--insecure", action="store_true")

    p = add("pull", c.cmd_pull, "download a global model version and verify its signature",
            "medfed pull --server fl.example.org:8443 --certs certs/hospitals/hospital-a "
            "--version latest --out models/latest")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", help="HOST:PORT of the model registry (HTTPS, mutual TLS)")
    src.add_argument("--registry", type=Path, help="a registry directory")
    p.add_argument("--certs", type=Path, default=None)
    p.add_argument("--version", default="latest", help="N | latest | best")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--public-key", type=Path, default=None,
                   help="server signing key (default: signing.pub in --certs, else "
                   "$MEDFED_HOME/signing.pub)")
    p.add_argument("--unsigned", action="store_true",
                   help="--registry only: copy a bundle without checking its signature")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")

    p = add("predict", c.cmd_predict,
            "predict locally with a verified bundle (calibrated probability and decision)",
            "medfed predict --model ~/.medfed/hospital-a/personalised --data new_patients.csv "
            "--out preds.csv")
    p.add_argument("--model", type=Path, required=True,
                   help="bundle directory (a site model, or a global version)")
    p.add_argument("--data", type=Path, required=True, help="CSV (tabular) or npz / PNG folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--site-stats", type=Path, default=None,
                   help="this hospital's statistics for a global model with normalisation "
                   "'site' (default: site_stats.json next to the model directory)")
    p.add_argument("--device", default="auto")
    _add_trust_args(p)

    p = add("evaluate", c.cmd_evaluate,
            "score a verified bundle on a labelled file: metrics with bootstrap intervals, "
            "confusion matrix, ROC and reliability plots",
            "medfed evaluate --model runs/heart-sim/nodes/cleveland/personalised "
            "--data data/heart-test/cleveland.csv --out reports/cleveland.json")
    p.add_argument("--model", type=Path, required=True, help="bundle directory")
    p.add_argument("--data", type=Path, required=True,
                   help="labelled CSV (with the label column) or npz with images and labels")
    p.add_argument("--site-stats", type=Path, default=None,
                   help="statistics for a global model with normalisation 'site'")
    p.add_argument("--out", type=Path, default=None,
                   help="report JSON to write; the ROC and reliability PNGs go beside it")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    _add_trust_args(p)

    p = add("schema", c.cmd_schema,
            "draft a schema from hospital CSVs for you to review (types, ranges, label codes)",
            "medfed schema --data data/heart/*.csv --label num --out schema.yaml")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="one or more CSV files")
    p.add_argument("--label", required=True, help="the label column")
    p.add_argument("--out", type=Path, required=True, help="schema YAML to write")
    p.add_argument("--ignore", action="append", default=[], metavar="COLUMN",
                   help="a column that is not a feature (site or split column); repeatable")
    p.add_argument("--force", action="store_true", help="replace an existing --out")

    p = add("check-data", c.cmd_check_data,
            "check a hospital's data file against a bundle, as the client or predict would read it",
            "medfed check-data --model models/latest --data /data/heart.csv --purpose training")
    p.add_argument("--model", type=Path, required=True, help="bundle directory")
    p.add_argument("--data", type=Path, required=True, help="CSV (tabular) or npz / PNG folder")
    p.add_argument("--test-data", type=Path, default=None,
                   help="the hospital's own test file, kept apart (training only)")
    p.add_argument("--purpose", choices=("training", "prediction"), default="training",
                   help="training (label column required, as `medfed client`) or prediction "
                   "(as `medfed predict`); default training")
    _add_trust_args(p)

    p = add("export-heart", c.cmd_export_heart,
            "write the four UCI heart hospitals as CSV files (for trying `medfed client`)",
            "medfed export-heart --out data/heart")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--protocol", default="flamby", help="flamby | impute")
    p.add_argument("--test-dir", type=Path, default=None,
                   help="also keep FLamby's test rows of each hospital apart, in this folder")

    p = add("console", c.cmd_console,
            "web console over run directories: runs, rounds, sites, versions, audit (read-only)",
            "medfed console --runs runs --port 8080")
    p.add_argument("--runs", type=Path, required=True,
                   help="a directory of run directories (or one run directory)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--public-key", type=Path, default=None,
                   help="key that verifies the versions' signatures (default: the run's own "
                   "signing key, else $MEDFED_HOME/signing.pub)")

    p = add("report", c.cmd_report,
            "write a run's page as one self-contained HTML file (charts inline, no server)",
            "medfed report runs/heart-sim --out heart-report.html")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory")
    p.add_argument("--out", type=Path, required=True, help="HTML file to write")

    p = add("model-card", c.cmd_model_card, "print a markdown model card for a bundle",
            "medfed model-card --model models/latest > MODEL_CARD.md")
    p.add_argument("--model", type=Path, required=True)
    _add_trust_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `medfed` console script."""
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("medfed").setLevel(logging.INFO)
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False  # Flower has its own console handler
    if not args.verbose:
        # a filter, not a level: Flower resets its logger's level when a run starts
        flwr_logger.addFilter(lambda record: record.levelno >= logging.WARNING)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("medfed: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as err:  # OSError: also a full disk, a quota, a read-only one
        print(f"medfed: error: {sentence(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def sentence(err: BaseException) -> str:
    """The message of `err`; an operating system's own (`[Errno 17] File exists: 'out'`,
    raised where a path given on the command line is a file where a directory goes, or the
    reverse) said in words naming the path."""
    if not (isinstance(err, OSError) and err.errno is not None and str(err).startswith("[Errno")):
        return str(err)  # medfed's own sentence
    path = err.filename2 if err.filename2 is not None else err.filename  # a rename: its target
    if path is None:  # e.g. a failed write(): the system's words, not "None: ..."
        return str(err.strerror)
    if err.errno == errno.EEXIST:
        return f"{path} is a file where a directory is needed; give a directory path"
    if err.errno == errno.EISDIR:
        return f"{path} is a directory where a file is written; give a file path"
    if err.errno == errno.ENOTDIR:
        return f"{path}: a part of this path is a file, not a directory"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"{path}: permission denied"
    return f"{path}: {err.strerror}"


if __name__ == "__main__":
    sys.exit(main())
