"""Test certificates, made by the openssl command when the tests run (no key is ever
committed; scripts/test.sh installs openssl where it is missing).

``make_pki(directory)`` writes two certificate authorities and the certificates the TLS
tests use, and returns their paths:

- ``ca``: the CA that signs everything good; ``rogue_ca``: another one;
- ``server`` / ``server_key``: localhost, game.test and 127.0.0.1;
- ``sni`` / ``sni_key``: b.test only (the second name of an SNI test);
- ``client`` / ``client_key``: a client certificate from ``ca`` (CN player1);
- ``rogue_client`` / ``rogue_client_key``: a client certificate from ``rogue_ca``.
"""
import os
import shutil
import subprocess
from pathlib import Path

OPENSSL = shutil.which("openssl")
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _run(*args, cwd):
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=60)


def _ca(d, stem, cn):
    _run("req", "-x509", *_KEY, "-keyout", f"{stem}.key", "-out", f"{stem}.pem",
         "-days", "30", "-subj", f"/CN={cn}",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _leaf(d, stem, ca, cn, *, san=None, client=False):
    # Key identifiers too: Python 3.13's default contexts verify strictly (RFC 5280).
    ext = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature",
           f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}",
           "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid"]
    if san:
        ext.append(f"subjectAltName={san}")
    (d / f"{stem}.ext").write_text("\n".join(ext) + "\n")
    _run("req", "-new", *_KEY, "-keyout", f"{stem}.key", "-out", f"{stem}.csr",
         "-subj", f"/CN={cn}", cwd=d)
    _run("x509", "-req", "-in", f"{stem}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
         "-set_serial", str(int.from_bytes(os.urandom(8), "big") >> 2), "-days", "30",
         "-sha256", "-extfile", f"{stem}.ext", "-out", f"{stem}.pem", cwd=d)


def make_pki(directory):
    if OPENSSL is None:
        raise RuntimeError("the openssl command is needed to make test certificates")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca", "iocpnet test CA")
    _ca(d, "rogue_ca", "rogue CA")
    _leaf(d, "server", "ca", "localhost", san="DNS:localhost,DNS:game.test,IP:127.0.0.1")
    _leaf(d, "sni", "ca", "b.test", san="DNS:b.test")
    _leaf(d, "client", "ca", "player1", client=True)
    _leaf(d, "rogue_client", "rogue_ca", "intruder", client=True)
    out = {}
    for stem in ("ca", "rogue_ca", "server", "sni", "client", "rogue_client"):
        out[stem] = str(d / f"{stem}.pem")
        if stem not in ("ca", "rogue_ca"):
            out[f"{stem}_key"] = str(d / f"{stem}.key")
    return out
