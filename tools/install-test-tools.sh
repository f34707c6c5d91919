#!/usr/bin/env bash
# External tools the tests use, installed by the project itself (a fresh CI machine has none).
# Idempotent and quick when everything is already present.
set -euo pipefail
cd "$(dirname "$0")/.."
