"""``fedfusion provision`` and ``fedfusion site keygen``: the commands around server/provision.py.

``site keygen`` is the recommended start of a federation: each site makes its own key pair and hands
the coordinator only ``site.pub``; ``provision --site-keys DIR`` then builds kits that hold no private
key. The coordinator can still generate keys (``provision`` without ``--site-keys``), but then it has
held every site's secret and must deliver it over a secure channel.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

from fedfusion.server.kit_files import SITE_KEY, SITE_PUB, fingerprint
from fedfusion.server.provision import ProvisionError, _write, make_site_key, provision


def write_own_site_key(out: Path, *, comment: str = "fedfusion-site", force: bool = False) -> bytes:
    """The site's own key pair in ``out`` (site.key 0600, site.pub); returns the public line.

    Refuses to replace an existing key unless ``force``: a registered key replaced would lock the
    site out until the coordinator registers the new one.
    """
    key_path, pub_path = out / SITE_KEY, out / SITE_PUB
    existing = next((p for p in (key_path, pub_path) if p.exists()), None)
    if existing is not None and not force:
        raise ProvisionError(f"{existing} already exists; refusing to replace a key that may be registered "
                             "(pass --force to make a new pair, then send the new site.pub to the coordinator)")
    if out.exists() and not out.is_dir():
        raise ProvisionError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    private, public = make_site_key()
    public_line = public + f" {comment}\n".encode()
    _write(key_path, private, private=True)
    _write(pub_path, public_line)
    return public_line


def openssh_fingerprint(public_line: bytes) -> str:
    """``SHA256:...`` as ``ssh-keygen -lf site.pub`` prints it, so a second tool can confirm the key."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def keygen_command(out: str, site_id: str | None, force: bool) -> int:
    """``fedfusion site keygen --out DIR``: write the pair, print what to send and the fingerprints."""
    folder = Path(out)
    try:
        public_line = write_own_site_key(folder, comment=f"fedfusion-site-{site_id}" if site_id else "fedfusion-site",
                                         force=force)
    except (ProvisionError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = f"{site_id}.pub" if site_id else "SITE.pub (your site id)"
    print(f"wrote {folder / SITE_KEY} (secret, 0600: it never leaves this host) and {folder / SITE_PUB}\n"
          f"  send only {SITE_PUB} to the coordinator, named {name}; it runs "
          "`fedfusion provision --site-keys DIR ...` and sends back a kit without any private key\n"
          f"  {SITE_PUB} fingerprint (SHA-256 of the file, as the kit README lists it): {fingerprint(public_line)}\n"
          f"  key fingerprint (as `ssh-keygen -lf {SITE_PUB}` prints it): {openssh_fingerprint(public_line)}\n"
          "  read both to the coordinator by phone when it confirms your key")
    return 0


def provision_command(args: argparse.Namespace, approved_apps: Sequence[str]) -> int:
    """``fedfusion provision``: write the kits and say where each folder goes (exit 2 with one line on error)."""
    try:
        result = provision(Path(args.out), args.sites, args.superlink_host, port=args.port, days=args.days,
                           schema=Path(args.schema) if args.schema else None, force=args.force, add=args.add,
                           approved_apps=approved_apps, site_keys=Path(args.site_keys) if args.site_keys else None)
    except ProvisionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    root = result.root
    lines = [f"wrote kits for {', '.join(result.sites)} under {root} (see {root / 'README.md'}):",
             f"  coordinator: fedfusion coordinator start --kit {root / 'coordinator'} --host 0.0.0.0 "
             f"--port {args.port}",
             f"  each site:   send {root}/SITE/ to that site only; keep {root / 'ca'} offline"]
    if result.own_keys:
        lines.append(f"  no private key in the kits of {', '.join(result.own_keys)}: each uses the site.key it "
                     "generated (`fedfusion site keygen`)")
    if not approved_apps:
        lines.append("  [approval] apps = [] in every site.toml: sites refuse every app bundle until they add the "
                     "hash `fedfusion app-hash` prints (read it to them by phone), or re-run with --approve-app HASH")
    lines.append(f"  roster.json ({len(result.roster_sites)} sites) fingerprint: {result.roster_fingerprint}")
    if args.add:
        others = [s for s in result.roster_sites if s not in result.sites]
        if others:
            lines.append(f"  the roster changed: existing sites ({', '.join(others)}) must install the new "
                         f"{root}/SITE/roster.json and re-approve it (compare the fingerprint above by phone), "
                         "or their secure rounds will not accept the new site")
    print("\n".join(lines))
    return 0
