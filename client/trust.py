"""Which key a hospital verifies bundles with, and how a model's inputs are prepared.

Signatures are mandatory at hospitals: `predict`, `evaluate`, `check-data` and `model-card`
verify with the federation's public key (``--public-key``, else ``signing.pub`` in
``--certs``, else ``$MEDFED_HOME/signing.pub``). Running an unsigned or unverifiable bundle
needs ``--unsigned`` and prints a warning line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.bundle import SITE_STATS_FILE, Bundle, BundleError, load_bundle, read_manifest
from common.data.preprocess import SiteStats, read_site_stats
from common.data.schema import DataError
from common.manifest import normalisation_mode, stats_from_manifest
from common.settings import medfed_home
from common.signing import load_public_key

UNSIGNED_WARNING = ("medfed: warning: --unsigned: the bundle's signature is NOT checked; "
                    "anyone who could change its files could have changed its predictions")


def verification_key(public_key: Path | None, certs: Path | None = None,
                     unsigned: bool = False) -> Ed25519PublicKey | None:
    """The federation's public key, or None (after a warning) with `unsigned`."""
    if unsigned:
        print(UNSIGNED_WARNING, file=sys.stderr, flush=True)
        return None
    if public_key is not None:
        return load_public_key(public_key)
    candidates = ([Path(certs) / "signing.pub"] if certs is not None else []) + [
        medfed_home() / "signing.pub"]
    for path in candidates:
        if path.exists():
            return load_public_key(path)
    shown = " or ".join(str(p) for p in candidates)
    raise BundleError(
        f"no federation public key to verify the bundle with ({shown} does not exist): give "
        "--public-key FILE (the server's signing.pub), or --unsigned to run it unverified"
    )


def open_bundle(model_dir: Path, key: Ed25519PublicKey | None) -> Bundle:
    """Load a bundle, its signature checked unless `key` is None (``--unsigned``)."""
    return load_bundle(Path(model_dir), key, require_signature=key is not None)


def open_manifest(model_dir: Path, key: Ed25519PublicKey | None) -> dict[str, Any]:
    """A bundle's verified manifest without building tensors."""
    return read_manifest(Path(model_dir), key, require_signature=key is not None)


def site_stats_for(bundle: Bundle, given: Path | None) -> tuple[SiteStats, str]:
    """The statistics the model's inputs are preprocessed with, and where they came from.

    A site model carries its own (the bytes hash-checked with the bundle); a `bundle`-mode
    model uses the bundle's; a `site`-mode global model needs the hospital's own file:
    `given`, else `site_stats.json` beside the model directory (where `medfed client`
    writes it).
    """
    model_dir, manifest = Path(bundle.path), bundle.manifest
    if SITE_STATS_FILE in manifest.get("files", {}):
        if given is not None:
            raise DataError(f"bundle {model_dir} carries its own site statistics; drop "
                            "--site-stats")
        where = f"{model_dir / SITE_STATS_FILE}"
        return _signed_site_stats(bundle.extras[SITE_STATS_FILE], where), \
            f"{where} (signed with the bundle)"
    if normalisation_mode(manifest) != "site":
        if given is not None:
            raise DataError(f"bundle {model_dir} uses the bundle's own statistics "
                            "(normalisation: bundle); drop --site-stats")
        return stats_from_manifest(manifest), "the bundle's statistics"
    path = given or model_dir.parent / SITE_STATS_FILE
    if not Path(path).exists():
        raise DataError(
            f"bundle {model_dir} preprocesses each hospital's data with that hospital's own "
            "training statistics (normalisation: site) and carries none: give --site-stats "
            "FILE, the site_stats.json that `medfed client` wrote next to the hospital's "
            "models (<workdir>/models/site_stats.json), or use the hospital's site model "
            "(<workdir>/personalised)"
        )
    stats = read_site_stats(Path(path))
    width = len(manifest["preprocessing"].get("feature_names") or [])
    if width and stats.normaliser.mean.size != width:
        raise DataError(f"site statistics {path} cover {stats.normaliser.mean.size} features; "
                        f"the model reads {width}")
    return stats, str(path)


def _signed_site_stats(data: bytes, where: str) -> SiteStats:
    """A site model's statistics from the bytes load_bundle verified (not re-read from disk)."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"site statistics file {where} is not a readable JSON file") from err
    return SiteStats.from_dict(raw, where=f"site statistics file {where}")
