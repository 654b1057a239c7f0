"""A real browser for the console tests: Debian's Chromium, driven by Playwright (Playwright's
own browser download is not reachable here, so it is pointed at `/usr/bin/chromium`).

The browser trusts the test CA by its public key (`--ignore-certificate-errors-spki-list`):
every other certificate is still checked, and the pages are real `https://` pages, so the
console's `Secure` cookies and its Content-Security-Policy behave as they do for an operator.
Screenshots go to `target/console-screenshots/`."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import ROOT

CHROMIUM = Path(os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium"))
SCREENSHOTS = ROOT / "target/console-screenshots"

# Chromium's flags for a closed network: no background connections, no first-run UI.
_FLAGS = [
    "--no-sandbox",  # as root, as CI runs
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def spki_sha256(ca_pem: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of a certificate, as Chromium's flag wants it."""
    cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@contextmanager
def chromium(ca_pem: Path) -> Iterator[object]:
    """A headless Chromium (a Playwright `Browser`) that trusts `ca_pem`'s key."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install chromium (scripts/test.sh does)")
    # Playwright gives each launch a fresh profile of its own and removes it on close.
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=_FLAGS + [f"--ignore-certificate-errors-spki-list={spki_sha256(ca_pem)}"],
        )
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
