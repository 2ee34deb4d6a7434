"""Certificates (a CA and the server certificates it signs) and SuperNode authentication keys.

Imports nothing from the project: docker/certs.yml runs this file alone inside a stock Flower image
(``python pki.py certs|keys ...``, same options as ``python -m server_app.deploy certs|keys``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

if __package__:
    from server_app.deploy.common import DeployError, _log
else:  # run as a lone file (docker/certs.yml mounts only this one): the same two as in common.py
    class DeployError(RuntimeError):
        """A deployment step failed; the message says which and where its log is."""

    def _log(msg: str) -> None:
        print(f"[deploy] {msg}", file=sys.stderr, flush=True)


DEFAULT_SANS = ("127.0.0.1", "localhost", "::1")


# --------------------------------------------------------------------------- certs


def make_certs(
    out: Path,
    sans: Sequence[str] = DEFAULT_SANS,
    days: int = 365,
    force: bool = False,
    name: str = "server",
    common_name: str | None = None,
) -> dict[str, Path]:
    """A CA (``ca.crt``/``ca.key``) and a server certificate ``<name>.pem``/``<name>.key`` it signs.

    ``sans`` are the IP addresses / DNS names clients dial (SuperLink address; in
    Docker also the SuperNodes' Runtime API names). An existing CA in ``out`` is
    reused, so several server certificates (``--name superlink``, ``--name
    supernode``) share one CA; existing files are kept unless ``force``. Uses the
    ``cryptography`` package (a Flower dependency), so it also runs inside the
    Flower images, which have no ``openssl`` binary.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "ca_cert": out / "ca.crt",
        "ca_key": out / "ca.key",
        "server_cert": out / f"{name}.pem",
        "server_key": out / f"{name}.key",
    }
    if not force and all(p.exists() for p in paths.values()):
        _log(f"certificates exist in {out}; keeping them (use --force to replace)")
        return paths
    if not sans:
        raise DeployError("at least one --san is needed")

    def _write(path: Path, data: bytes, private: bool) -> None:
        path.write_bytes(data)
        os.chmod(path, 0o600 if private else 0o644)

    pem = serialization.Encoding.PEM
    nokey = serialization.NoEncryption()
    now = _dt.datetime.now(_dt.UTC) - _dt.timedelta(minutes=5)
    until = now + _dt.timedelta(days=days)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedTime-MAGNET CA")])

    if not force and paths["ca_cert"].exists() and paths["ca_key"].exists():
        ca_key = serialization.load_pem_private_key(paths["ca_key"].read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
        ca_name = ca_cert.subject
        _log(f"reusing the CA in {out}")
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write(paths["ca_key"], ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nokey), True)
        _write(paths["ca_cert"], ca_cert.public_bytes(pem), False)

    alt: list[x509.GeneralName] = []
    for san in dict.fromkeys(sans):  # de-duplicate, keep order
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            alt.append(x509.DNSName(san))
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"fedtime-{name}")]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(min(until, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(paths["server_key"], srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nokey), True)
    _write(paths["server_cert"], srv_cert.public_bytes(pem), False)
    _log(f"wrote {paths['server_cert'].name} (SANs: {', '.join(dict.fromkeys(sans))}) signed by {paths['ca_cert']}")
    return paths


def split_sans(values: Iterable[str]) -> list[str]:
    """``["a,b", "c"]`` → ``["a", "b", "c"]`` (empty entries dropped)."""
    return [x.strip() for v in values for x in v.split(",") if x.strip()]


def chown_tree(paths: Iterable[Path], owner: str) -> None:
    """``chown UID[:GID]`` (needs root): Flower's images run as uid 49999 and must read the keys."""
    uid_s, _, gid_s = owner.partition(":")
    uid, gid = int(uid_s), int(gid_s or uid_s)
    for path in paths:
        os.chown(path, uid, gid)


# --------------------------------------------------------------------------- keys


def make_keys(
    out: Path, nodes: int, prefix: str = "supernode-", force: bool = False, first: int = 0
) -> list[dict[str, Path]]:
    """ECDSA P-384 key pairs in OpenSSH format: ``<prefix>i`` and ``<prefix>i.pub``, i = first..first+nodes-1.

    Same format as ``ssh-keygen -t ecdsa -b 384 -N "" -f keys/supernode-i``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(first, first + nodes):
        priv, pub = out / f"{prefix}{i}", out / f"{prefix}{i}.pub"
        if force or not (priv.exists() and pub.exists()):
            key = ec.generate_private_key(ec.SECP384R1())
            priv.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.OpenSSH,
                    serialization.NoEncryption(),
                )
            )
            os.chmod(priv, 0o600)
            pub.write_bytes(
                key.public_key().public_bytes(
                    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
                )
                + f" {prefix}{i}\n".encode()
            )
        pairs.append({"private": priv, "public": pub})
    _log(f"{nodes} SuperNode key pair(s) in {out}")
    return pairs


# --------------------------------------------------------------------------- CLI


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The ``certs`` and ``keys`` sub-commands, for ``python -m server_app.deploy`` and for this file run alone."""
    c = sub.add_parser("certs", help="create a CA and a server certificate")
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--san", action="append", default=[], help="IP or DNS name (repeat, or comma-separated)")
    c.add_argument("--days", type=int, default=365)
    c.add_argument("--name", default="server", help="server certificate file stem (<name>.pem, <name>.key)")
    c.add_argument("--force", action="store_true", help="replace an existing CA and certificate")
    c.add_argument("--owner", help="chown the files to UID[:GID] (e.g. 49999 for Flower's images; root only)")

    k = sub.add_parser("keys", help="create SuperNode authentication key pairs")
    k.add_argument("--out", required=True, type=Path)
    k.add_argument("--nodes", type=int, required=True)
    k.add_argument("--prefix", default="supernode-")
    k.add_argument("--first", type=int, default=0, help="index of the first key (Docker services count from 1)")
    k.add_argument("--force", action="store_true")
    k.add_argument("--owner", help="chown the files to UID[:GID] (root only)")


def run_command(args: argparse.Namespace) -> None:
    """Carry out ``certs`` or ``keys`` (``args`` from a parser built with :func:`add_commands`)."""
    if args.cmd == "certs":
        paths = make_certs(args.out, split_sans(args.san) or list(DEFAULT_SANS), days=args.days, force=args.force,
                           name=args.name)
        if args.owner:
            chown_tree([Path(args.out), *paths.values()], args.owner)
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    elif args.cmd == "keys":
        pairs = make_keys(args.out, args.nodes, prefix=args.prefix, force=args.force, first=args.first)
        if args.owner:
            chown_tree([Path(args.out), *(p for pair in pairs for p in pair.values())], args.owner)
        print(json.dumps([{k: str(v) for k, v in p.items()} for p in pairs], indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    """``python pki.py certs|keys ...``, as docker/certs.yml runs it; exit status 2 on a ``DeployError``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_commands(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    try:
        run_command(args)
    except DeployError as err:
        _log(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
