#!/usr/bin/env bash
# Create config/ for docker compose: a token for the demo host (hash for the authority, token for the agent).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p config && chmod 700 config
token=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
hash=$(printf '%s' "$token" | python3 -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
printf '{"hosts": {"demo-host": "%s"}}\n' "$hash" > config/tokens.json
umask 077
cat > config/demo-agent.conf <<CONF
host_id = "demo-host"
token = "$token"
gateway_urls = ["ws://gateway-lb:8765/agent"]
ledger_path = "/tmp/warlock-ledger.jsonl"
CONF
chmod 644 config/tokens.json   # hashes only; the agent config stays 0600
echo "wrote config/tokens.json and config/demo-agent.conf (demo-host)"
