#!/bin/sh
# Warlock agent reconfiguration: rewrite agent.conf with a new token (stdin, or WARLOCK_TOKEN) and
# restart the agent (systemd unit, or the process started without systemd). WARLOCK_HOST_ID and
# WARLOCK_GATEWAY_URLS replace the host id and gateway URLs when set; every other line is kept.
# Prints `STEP <name> ok|fail <detail>` lines and `STATE running|not_installed systemd=<0|1>`.
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
read_token || { step inputs fail "the token (stdin or WARLOCK_TOKEN) must be 64 lowercase hex characters"; exit 2; }
step inputs ok "prefix $PREFIX"

if [ ! -f "$CONF" ] || [ ! -x "$AGENT_BIN" ]; then
    step config fail "the agent is not installed under $PREFIX; nothing was changed"
    state not_installed $SYSTEMD
    exit 0
fi

# keep every line but the three rewritten ones (grep reads the file: the old token is in no argv)
[ -n "$HOST_LINE" ] || HOST_LINE=$(grep -E '^host_id[[:space:]]*=' "$CONF" | head -n 1)
[ -n "$URLS_LINE" ] || URLS_LINE=$(grep -E '^gateway_urls[[:space:]]*=' "$CONF" | head -n 1)
[ -n "$HOST_LINE" ] && [ -n "$URLS_LINE" ] || fail config "$CONF has no host_id or gateway_urls; install again"
KEEP=$(mktemp) || fail config "mktemp failed"
grep -vE '^(#|host_id|token|gateway_urls)([[:space:]]|=)' "$CONF" | grep -v '^[[:space:]]*$' >"$KEEP"
grep -qE '^ledger_path[[:space:]]*=' "$KEEP" || printf 'ledger_path = "%s"\n' "$LEDGER" >>"$KEEP"
write_config "$HOST_LINE" "$URLS_LINE" "$KEEP" || { rm -f "$KEEP"; fail config "cannot write $CONF"; }
rm -f "$KEEP"
step config ok "$CONF"

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
