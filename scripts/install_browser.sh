#!/usr/bin/env bash
# Install Debian's Chromium and its WebDriver for the browser test (tests/test_serve_browser.py).
# Idempotent: does nothing when both are already installed. Needs root (CI containers run as root).
# Usage: bash scripts/install_browser.sh
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "chromium and chromedriver already installed: $(chromium --version 2>/dev/null || true)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core
echo "installed: $(chromium --version 2>/dev/null || true), chromedriver at $(command -v chromedriver)"
