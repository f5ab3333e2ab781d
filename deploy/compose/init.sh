#!/usr/bin/env bash
# Create config/ for docker compose: the SSH fallback worker's key pair (the demo host trusts its public key).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p config/ssh && chmod 700 config config/ssh
if [ ! -f config/ssh/id_ed25519 ]; then
  ssh-keygen -q -t ed25519 -N '' -C warlock-fallback-ssh -f config/ssh/id_ed25519
fi
chmod 600 config/ssh/id_ed25519 && chmod 644 config/ssh/id_ed25519.pub
echo "wrote config/ssh/id_ed25519(.pub)"
