"""The text files of a kit ``fedfusion provision`` writes: site.toml, the site README, the overview.

Why a module of its own: what a site runs with is decided here, and it must be safe before anyone
edits it. Every site.toml written here therefore

- refuses every app bundle except the ones named in ``[approval] apps`` (an empty list refuses all,
  until the site pastes the hash the coordinator reads to it by phone from ``fedfusion app-hash``);
- sends updates only masked (``[site] require-secure-aggregation = true``);
- trains only with DP-SGD under a ``[privacy]`` budget, capped over all studies as well as per study
  (the coordinator names the study, so a per-study cap alone could be escaped by renaming it);
- trusts only the peers of its ``[federation] roster`` (``roster.json``, written by
  :func:`fedfusion.common.roster.write_roster`).

The values below are the defaults a site starts from; the site lowers them as its own policy says.
"""

from __future__ import annotations

from collections.abc import Sequence

SITE_KEY = "site.key"
SITE_PUB = "site.pub"
ROSTER = "roster.json"
#: The [privacy] a kit starts with: ε = 3 per study and over all studies together, δ = 1e-5.
DEFAULT_MAX_EPSILON = 3.0
DEFAULT_DELTA = 1e-5
DEFAULT_MAX_GRAD_NORM = 1.0


def fingerprint(data: bytes) -> str:
    """SHA-256 of a file's bytes, grouped for reading aloud when a site confirms its kit by phone."""
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    return ":".join(digest[i:i + 4] for i in range(0, 32, 4))


def _line(setting: str, comment: str) -> str:
    return f"{setting:<47} # {comment}"


def approval_table(approved_apps: Sequence[str]) -> str:
    """``[approval]``: the given bundle hashes, or an empty list that refuses every bundle."""
    if approved_apps:
        apps = ", ".join(f'"{h}"' for h in sorted(approved_apps))
        return f"""[approval]                                      # only these app bundles ever run at this site
apps = [{apps}]
# the SHA-256 the coordinator's `fedfusion app-hash` prints; confirm it by phone, add one per new bundle
"""
    return """[approval]                                      # only these app bundles ever run at this site
apps = []                                       # EDIT: empty refuses every bundle. Paste the SHA-256 the
                                                # coordinator reads you by phone (`fedfusion app-hash`)
"""


def site_toml(site_id: str, address: str, *, schema: str | None, approved_apps: Sequence[str] = (),
              own_key: bool = False) -> str:
    """The site.toml of a kit: TLS, node authentication and the safe defaults filled in, data paths to edit.

    ``own_key``: the site generated its key pair itself (``fedfusion site keygen``); the kit carries
    only the public half and site.toml names where the site puts its private key.
    """
    schema_line = (f'schema = "{schema}"                        # the study\'s data contract (in this kit)'
                   if schema else 'schema = "/etc/fedfusion/schema.json"   # EDIT: schema.json from the coordinator')
    key_comment = ("your own key from `fedfusion site keygen` (NOT in this kit: copy it here, 0600)" if own_key
                   else "this site's SuperNode key (keep it 0600, never send it anywhere)")
    return f"""# site.toml for {site_id}, written by `fedfusion provision`.
# Relative paths resolve against this file's folder. Edit the lines marked EDIT, then:
#   fedfusion site check MANIFEST --schema SCHEMA && fedfusion site start site.toml
[site]
id = "{site_id}"
manifest = "/srv/fedfusion/manifest.csv"        # EDIT: your manifest (one row per patient)
{schema_line}
device = "auto"                                 # auto, cpu, cuda, cuda:1
require-secure-aggregation = true               # never send an update unmasked, whatever a run asks
# audit-log = "/var/lib/fedfusion/audit.jsonl"  # default: audit.jsonl beside this file

[coordinator]
address = "{address}"
root-certificates = "ca.pem"                    # the federation CA: the site checks the coordinator against it

[auth]
private-key = "{SITE_KEY}"                        # {key_comment}
public-key = "{SITE_PUB}"                         # the coordinator registered this one; checked against private-key

[federation]
roster = "{ROSTER}"                         # every site's public key: the only peers this site trusts

[privacy]                                       # the site trains only with DP-SGD, within these budgets
{_line(f"max-epsilon = {DEFAULT_MAX_EPSILON}", "the most ε this site spends on one study, ever")}
{_line(f"max-epsilon-all-studies = {DEFAULT_MAX_EPSILON}", "... and on all studies together (renaming buys nothing)")}
{_line(f"delta = {DEFAULT_DELTA:g}", "δ of every (ε, δ) above")}
{_line(f"max-grad-norm = {DEFAULT_MAX_GRAD_NORM}", "largest per-sample clipping norm a run may use")}
# ledger = "/var/lib/fedfusion/privacy-ledger.json"  # default: beside this file; keep it with the site's state

{approval_table(approved_apps)}
[supernode]
port = 9094                                     # loopback only; one per SuperNode on a host
"""


def site_readme(site_id: str, address: str, ca_pem: bytes, public_key: bytes, has_schema: bool,
                own_key: bool = False) -> str:
    """The kit's README: what each file is, the fingerprints to confirm by phone, the first commands."""
    schema_line = "- `schema.json`: the study's data contract.\n" if has_schema else ""
    key_line = (f"- `{SITE_KEY}`: **not in this kit**. You generated it with `fedfusion site keygen` and sent the\n"
                "  coordinator only its public half; copy it beside `site.toml` (0600) or point `[auth] private-key`\n"
                "  at it." if own_key else
                f"- `{SITE_KEY}`: **secret**, this site's private key (OpenSSH, ECDSA P-256). It proves to the\n"
                "  coordinator that requests come from this site. Never copy it anywhere else; nobody else needs it.")
    return f"""# fedfusion site kit: {site_id}

From the coordinator of the federation. Install it on the site host, readable only by the user that
runs `fedfusion site start` (the `fedfusion` service user): the folder 0700, `{SITE_KEY}` 0600.

- `ca.pem`: the federation CA certificate. The site accepts only a coordinator whose certificate this
  CA signed (TLS).
{key_line}
- `{SITE_PUB}`: the matching public key. The coordinator has registered it.
- `{ROSTER}`: every site of the federation and its public key. In a secure round this site trusts only
  these peers; when the coordinator sends a new roster (a site joined), check it and replace this file.
- `site.toml`: the site config. Edit `manifest` (and `schema`), and `[approval] apps` (below), then start.
{schema_line}
Safe defaults, already on: only approved app bundles run (`[approval]`), updates leave only masked
(`require-secure-aggregation`), training is DP-SGD within `[privacy]` budgets (ε {DEFAULT_MAX_EPSILON:g} per study
and over all studies together). Lower them as your policy requires; raising them is your decision.

The site connects **outbound** to `{address}` (HTTPS); nothing at the site listens on the network.

Confirm with the coordinator by phone that these fingerprints (SHA-256 of the files) match theirs:

- `ca.pem`: `{fingerprint(ca_pem)}`
- `{SITE_PUB}`: `{fingerprint(public_key)}`

Then:

```bash
fedfusion site check /srv/fedfusion/manifest.csv --schema schema.json
fedfusion site start site.toml
```

If the log says `Failed to activate SuperNode`, the coordinator has not registered `{SITE_PUB}`. If it
says `certificate verify failed`, `ca.pem` is not the CA of the coordinator at `{address}` (or a proxy
intercepts TLS). The full guide is docs/hospital-it.md.
"""


def top_readme(sites: Sequence[str], hosts: Sequence[str], port: int) -> str:
    """The overview at the top of the kits folder: which folder goes where."""
    site_lines = "\n".join(f"- `{s}/`: to site `{s}` only, over a secure channel." for s in sites)
    return f"""# fedfusion kits

Written by `fedfusion provision` for the SuperLink at {', '.join(hosts)} (port {port}).

- `ca/`: to **nobody**. Keep `ca.key` offline (an encrypted USB stick, a vault); it is only needed to
  issue a new SuperLink certificate.
- `coordinator/`: to the coordinator host. `fedfusion coordinator start --kit coordinator/ ...` turns on
  TLS and node authentication and registers every key in `coordinator/sites/`. `coordinator/{ROSTER}`
  lists every site's public key, as every site kit does.
{site_lines}

Adding a site later: `fedfusion provision --add --sites NEW --superlink-host {hosts[0]} --out THIS_FOLDER`,
copy `coordinator/sites/NEW.pub` to the coordinator and run `fedfusion coordinator register-sites` there
(or restart the coordinator). It rewrites `{ROSTER}` in every kit: send it to every existing site, which
checks and installs it (secure rounds with the new site need it).
"""
