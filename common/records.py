"""Names shared by server and client: message types, record keys and config keys.

Flower's own keys are kebab-case (`num-examples`, `server-round`); ours follow suit.
"""

from __future__ import annotations

# Custom message actions (`@app.query(NAME)` on the client, "query.NAME" on the wire).
QUERY_BACKBONE = "backbone"
QUERY_SAVE_MODEL = "save_model"
QUERY_ADAPT = "adapt"  # build the site model (adaptation, calibration, threshold)
QUERY_SAVE_SITE_MODEL = "save_site_model"  # the server's signed manifest for it

# Record keys inside a message's RecordDict.
ARRAYS = "arrays"  # trainable tensors (Flower strategies' default key)
CONFIG = "config"  # round config (Flower strategies' default key)
METRICS = "metrics"
SITE = "site"  # ConfigRecord with the site's name (no patient data)
BACKBONE_FILE = "backbone-file"  # ArrayRecord: the raw bytes of backbone.safetensors
HEAD_FILE = "head-file"  # ArrayRecord: the raw bytes of head.safetensors
BUNDLE_META = "bundle"  # ConfigRecord: manifest text, signature, sha256
SITE_MODEL = "site-model"  # ConfigRecord: how a site model was chosen, hashes of its files
SITE_KEPT_ADAPTED = "kept-adapted"  # 1: the site keeps its adapted model, 0: the global one

# Config keys.
NUM_EXAMPLES = "num-examples"
SERVER_ROUND = "server-round"
BACKBONE_SHA256 = "backbone-sha256"
MANIFEST_JSON = "manifest-json"
MANIFEST_SIG = "manifest-sig"
HAS_BACKBONE = "has-backbone"
NUM_TRAIN = "num-train"  # training rows a site declares when provisioned (upper bound)
ROUND_OFFSET = "round-offset"  # rounds completed before a resume
PROXIMAL_MU = "proximal-mu"  # sent by Flower's FedProx
EVALUATE_WITH_TRAIN = "evaluate-with-train"  # 1: score the received model before training
SITE_NAME = "name"
VERSION = "version"

# Prefix of the error text a client raises when its cache lacks the backbone; the server
# then sends the backbone and retries that node once.
MISSING_BACKBONE = "backbone-missing"
# Prefix of the error text a hospital sends when its data does not match the model; it then
# stops (medfed client exits with the full sentence) and the server goes on without it.
DATA_REFUSED = "data-refused"
DATA_REFUSED_FILE = "data-refused.json"  # in the hospital's work directory
