#!/usr/bin/env bash
# Starts the chat app from its checkout and opens it in the default browser.
# The first start sets up .venv, the embedded model and the CPU kernels.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/../.."
exec make run
