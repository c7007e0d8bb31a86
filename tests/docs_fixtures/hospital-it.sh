# docs/hospital-it.md: a site installed as the guide describes (in the harness's private copy of /etc,
# /var and /srv): the kit's ca.pem and schema.json in /etc/fedfusion, a site.toml whose key the guide's
# ssh-keygen block makes, the research export in /srv/research/fedfusion (the shipped ovarian cohorts),
# and an audit log in the state folder holding replies of run 4711 (a study without DP), written by the
# site's own audit writer as three rounds of a federation leave them.
fedfusion provision --sites st-marys --superlink-host coordinator.example.org --out .kits
mkdir -p /etc/fedfusion /var/lib/fedfusion /srv/research
fedfusion datasets build ovarian /srv/research/fedfusion
cp .kits/st-marys/ca.pem /etc/fedfusion/ca.pem
cp /srv/research/fedfusion/schema.json /etc/fedfusion/schema.json
cat > /etc/fedfusion/site.toml <<'TOML'
[site]
id = "st-marys"
manifest = "/srv/research/fedfusion/manifest.csv"
schema = "/etc/fedfusion/schema.json"
device = "cpu"
audit-log = "/var/lib/fedfusion/audit.jsonl"

[coordinator]
address = "coordinator.example.org:9092"
root-certificates = "/etc/fedfusion/ca.pem"

[auth]
private-key = "/etc/fedfusion/site.key"

[supernode]
port = 9094
TOML
python - <<'PY'
import numpy as np

from fedfusion.client.audit import AuditLog

log = AuditLog("/var/lib/fedfusion/audit.jsonl", site_id="st-marys")
rng = np.random.default_rng(0)
for run_id in (4711, 4712):
    for server_round in (1, 2, 3):
        weights = {"encoder.weight": rng.normal(size=(16, 8)).astype("float32"),
                   "head.bias": rng.normal(size=(2,)).astype("float32")}
        # No "epsilon": a study without DP. A reply with ε and no privacy ledger beside it would (rightly)
        # stop `site start` until the ledger is restored from backup.
        log.record_reply(weights, {"num-examples": 120, "loss": 0.7 - 0.1 * server_round},
                         run_id=run_id, server_round=server_round, message_type="train", node_id=8141390387061342474)
        log.record_reply({}, {"num-examples": 40, "auc": 0.8}, run_id=run_id, server_round=server_round,
                         message_type="evaluate", node_id=8141390387061342474)
PY
