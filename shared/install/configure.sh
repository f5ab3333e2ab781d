#!/bin/sh
# Warlock agent reconfiguration: rewrite agent.conf with a new token made here (from /dev/urandom; no
# token travels) and restart the agent (systemd unit, or the process started without systemd).
# WARLOCK_HOST_ID, WARLOCK_GATEWAY_URLS, WARLOCK_TRUSTED_KEYS (comma-separated ed25519:... keys) and
# WARLOCK_CA_PEM_FILE (a PEM CA, copied to ca.pem next to the config) replace the host id, gateway URLs,
# trusted keys and CA when set; every other line is kept. The agent's own key is kept (made if missing).
# Prints `STEP <name> ok|fail <detail>` lines, `AGENT_PUBLIC_KEY ed25519:...`, `TOKEN_SHA256 <hex>` and
# `STATE running|not_installed systemd=<0|1>`.
# Exit codes: 0 running (or not installed: nothing changed); 1 a step failed (no STATE line); 2 bad input.

# @include common.sh

SYSTEMD=0
has_systemd && SYSTEMD=1

HOST_LINE=
if [ -n "${WARLOCK_HOST_ID:-}" ]; then
    check_host_id "$WARLOCK_HOST_ID" || { step inputs fail "WARLOCK_HOST_ID must match [a-z0-9_-]{1,63}"; exit 2; }
    HOST_LINE="host_id = \"$WARLOCK_HOST_ID\""
fi
URLS_LINE=
if [ -n "${WARLOCK_GATEWAY_URLS:-}" ]; then
    urls_toml "$WARLOCK_GATEWAY_URLS" || { step inputs fail "WARLOCK_GATEWAY_URLS must be ws:// or wss:// URLs"; exit 2; }
    URLS_LINE="gateway_urls = $URLS_TOML"
fi
KEYS_LINE=
if [ -n "${WARLOCK_TRUSTED_KEYS:-}" ]; then
    trusted_toml "$WARLOCK_TRUSTED_KEYS" || { step inputs fail "WARLOCK_TRUSTED_KEYS must be ed25519:... public keys"; exit 2; }
    KEYS_LINE="trusted_keys = $KEYS_TOML"
fi
CA_PEM=${WARLOCK_CA_PEM_FILE:-}
if [ -n "$CA_PEM" ]; then
    grep -q -- '-----BEGIN CERTIFICATE-----' "$CA_PEM" 2>/dev/null || { step inputs fail "WARLOCK_CA_PEM_FILE is not a PEM certificate: $CA_PEM"; exit 2; }
fi
unset WARLOCK_TOKEN
make_token || { step inputs fail "cannot make a token (no /dev/urandom with od, nor python3)"; exit 2; }
step inputs ok "prefix $PREFIX"

if [ ! -f "$CONF" ] || [ ! -x "$AGENT_BIN" ]; then
    step config fail "the agent is not installed under $PREFIX; nothing was changed"
    state not_installed $SYSTEMD
    exit 0
fi

# keep every line but the rewritten ones (grep reads the file: the old token is in no argv)
line_of() { grep -E "^$1[[:space:]]*=" "$CONF" | head -n 1; }
[ -n "$HOST_LINE" ] || HOST_LINE=$(line_of host_id)
[ -n "$URLS_LINE" ] || URLS_LINE=$(line_of gateway_urls)
[ -n "$KEYS_LINE" ] || KEYS_LINE=$(line_of trusted_keys)
[ -n "$HOST_LINE" ] && [ -n "$URLS_LINE" ] || fail config "$CONF has no host_id or gateway_urls; install again"
[ -n "$KEYS_LINE" ] || fail config "$CONF has no trusted_keys and WARLOCK_TRUSTED_KEYS is not set"
ID_LINE=$(line_of identity_key_file)
[ -n "$ID_LINE" ] || ID_LINE="identity_key_file = \"$IDENTITY_KEY\""
CA_LINE=$(line_of ca_file)
[ -n "$CA_PEM" ] && CA_LINE="ca_file = \"$CA_FILE\""
TRUST_LINES="$ID_LINE
$KEYS_LINE"
[ -n "$CA_LINE" ] && TRUST_LINES="$TRUST_LINES
$CA_LINE"
KEEP=$(mktemp) || fail config "mktemp failed"
grep -vE '^(#|host_id|token|gateway_urls|trusted_keys|identity_key_file|ca_file)([[:space:]]|=)' "$CONF" |
    grep -v '^[[:space:]]*$' >"$KEEP"
grep -qE '^ledger_path[[:space:]]*=' "$KEEP" || printf 'ledger_path = "%s"\n' "$LEDGER" >>"$KEEP"
if [ -n "$CA_PEM" ]; then
    mkdir -p "$CONF_DIR" && install_ca "$CA_PEM" || { rm -f "$KEEP"; fail config "cannot write $CA_FILE"; }
fi
write_config "$HOST_LINE" "$URLS_LINE" "$KEEP" || { rm -f "$KEEP"; fail config "cannot write $CONF"; }
rm -f "$KEEP"
step config ok "$CONF"
KEYGEN_ERROR=
make_identity || fail identity "warlock-agent keygen failed: $(printf '%s' "$KEYGEN_ERROR" | tail -n 3)"
step identity ok "$AGENT_PUBLIC_KEY"
report_token
step token ok "sha256 $TOKEN_SHA256 (made on this host)"

if [ $SYSTEMD = 1 ] && [ -e "$UNIT" ]; then
    OUT=$(systemctl restart "$UNIT_NAME" 2>&1) || fail restart "systemctl restart: $OUT"
    sleep 1
    unit_active || fail restart "$UNIT_NAME is not active"
    step restart ok "$UNIT_NAME restarted"
    state running 1
    exit 0
fi
stop_direct && step stop ok "stopped the previous agent"
STARTED_PID=
start_direct || fail restart "the agent exited at once: $(tail_of "$LOG" 5)"
step restart ok "pid $STARTED_PID"
state running 0
exit 0
