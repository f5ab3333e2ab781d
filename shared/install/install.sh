#!/bin/sh
# Warlock agent installer: install, or upgrade in place, the agent from an already-copied wheel.
#
# Used both by the SSH worker (push) and by hosts that pull it from GET /agent/install.sh. Inputs come
# ONLY from the environment and stdin, never from arguments (the token must not reach any argv):
#   WARLOCK_PREFIX        root the files go under (default /; tests use a scratch directory)
#   WARLOCK_HOST_ID       this host's id ([a-z0-9_-]{1,63})
#   WARLOCK_GATEWAY_URLS  comma-separated ws:// or wss:// gateway URLs
#   WARLOCK_TRUSTED_KEYS  comma-separated ed25519:... public keys of the API (the agent runs only what
#                         they signed)
#   WARLOCK_CA_PEM_FILE   optional: a PEM CA certificate the agent pins for wss:// (copied to ca.pem
#                         next to the config, named by `ca_file`)
#   WARLOCK_MAKE_TOKEN    1: make the agent's token here, from /dev/urandom (the SSH push: no token
#                         travels); else the token is read as below (pull)
#   WARLOCK_API_URL       optional (pull): enroll the agent's public key with POST <url>/agent/enroll,
#                         authenticated by the token (curl reads it from stdin, never from its argv)
#   WARLOCK_WHEEL         path of the agent wheel (keep its real *.whl file name)
#   WARLOCK_WHEEL_SHA256  expected SHA-256 of the wheel (checked before anything is changed)
#   WARLOCK_MODE          auto (systemd if the host runs it, else report no_systemd and change nothing),
#                         systemd, or direct (start the agent without systemd, e.g. in a container)
#   WARLOCK_PYTHON        interpreter used to create the virtual environment (default python3)
#   the token             (pull) first line of stdin, or WARLOCK_TOKEN when that is set (use the variable
#                         when the script itself arrives on stdin, as in `curl ... | sh`)
# Prints `STEP <name> ok|fail <detail>` per step, `AGENT_PUBLIC_KEY ed25519:...` (the agent's own key,
# made here by `warlock-agent keygen`; the private key never leaves the host), `TOKEN_SHA256 <hex>` (the
# token itself is never printed) and `STATE <state> systemd=<0|1>` at the end.
# Exit codes: 0 installed and running; 1 a step failed (no STATE line); 2 bad input;
# 3 no systemd (mode auto or systemd on a host without it; nothing was changed).
#
# What lands where (under WARLOCK_PREFIX): opt/warlock-agent (virtual environment),
# etc/warlock/agent.conf (0600, dir 0700), etc/warlock/agent.key (the agent's Ed25519 key, 0600),
# etc/warlock/ca.pem (with WARLOCK_CA_PEM_FILE), var/lib/warlock-agent (ledger; agent.pid in direct mode),
# etc/systemd/system/warlock-agent.service (systemd mode), var/log/warlock-agent.log (direct mode).

# @include common.sh

MODE=${WARLOCK_MODE:-auto}
PYTHON=${WARLOCK_PYTHON:-python3}
WHEEL=${WARLOCK_WHEEL:-}
WHEEL_SHA256=${WARLOCK_WHEEL_SHA256:-}
HOST_ID=${WARLOCK_HOST_ID:-}

# ---------------------------------------------------------------- inputs (nothing is changed yet)
case $MODE in auto | systemd | direct) ;; *) step inputs fail "WARLOCK_MODE must be auto, systemd or direct"; exit 2 ;; esac
check_host_id "$HOST_ID" || { step inputs fail "WARLOCK_HOST_ID must match [a-z0-9_-]{1,63}"; exit 2; }
urls_toml "${WARLOCK_GATEWAY_URLS:-}" || {
    step inputs fail "WARLOCK_GATEWAY_URLS must be comma-separated ws:// or wss:// URLs without quotes or spaces"
    exit 2
}
trusted_toml "${WARLOCK_TRUSTED_KEYS:-}" || {
    step inputs fail "WARLOCK_TRUSTED_KEYS must be comma-separated ed25519:... public keys of the API"
    exit 2
}
CA_PEM=${WARLOCK_CA_PEM_FILE:-}
if [ -n "$CA_PEM" ]; then
    grep -q -- '-----BEGIN CERTIFICATE-----' "$CA_PEM" 2>/dev/null || { step inputs fail "WARLOCK_CA_PEM_FILE is not a PEM certificate: $CA_PEM"; exit 2; }
fi
if [ "${WARLOCK_MAKE_TOKEN:-0}" = 1 ]; then
    unset WARLOCK_TOKEN
    make_token || { step inputs fail "cannot make a token (no /dev/urandom with od, nor $PYTHON)"; exit 2; }
    TOKEN_FROM="made on this host"
else
    read_token || { step inputs fail "the token (stdin or WARLOCK_TOKEN) must be 64 lowercase hex characters"; exit 2; }
    TOKEN_FROM="given"
fi
[ -f "$WHEEL" ] || { step inputs fail "WARLOCK_WHEEL is not a file: $WHEEL"; exit 2; }
case $WHEEL in *.whl) ;; *) step inputs fail "WARLOCK_WHEEL must keep its .whl file name"; exit 2 ;; esac
step inputs ok "host $HOST_ID, mode $MODE, prefix $PREFIX, token $TOKEN_FROM"

enroll() { # POST the public key to the API, the token as Bearer: curl reads that header from stdin (-K -)
    command -v curl >/dev/null 2>&1 || { ENROLL_OUT="curl is not installed"; return 1; }
    _body=$(printf '{"host_id":"%s","public_key":"%s"}' "$HOST_ID" "$AGENT_PUBLIC_KEY")
    ENROLL_OUT=$(printf 'header = "Authorization: Bearer %s"\n' "$TOKEN" |
        curl -fsS -K - -H 'Content-Type: application/json' --data "$_body" "${WARLOCK_API_URL%/}/agent/enroll" 2>&1)
}

# ---------------------------------------------------------------- the wheel's SHA-256, first
if command -v sha256sum >/dev/null 2>&1; then
    ACTUAL=$(sha256sum <"$WHEEL" | cut -d' ' -f1)
elif command -v openssl >/dev/null 2>&1; then
    ACTUAL=$(openssl dgst -sha256 <"$WHEEL" | sed 's/^.* //')
else
    ACTUAL=$("$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())' <"$WHEEL")
fi
[ "$ACTUAL" = "$WHEEL_SHA256" ] || fail sha256 "wheel SHA-256 is $ACTUAL, expected ${WHEEL_SHA256:-<unset>}; nothing was changed"
step sha256 ok "$ACTUAL"

# ---------------------------------------------------------------- systemd or not
SYSTEMD=0
has_systemd && SYSTEMD=1
if [ "$MODE" = auto ]; then
    if [ $SYSTEMD = 1 ]; then MODE=systemd; else
        step systemd fail "this host does not run systemd; nothing was changed (install again with mode direct to run the agent without it)"
        state no_systemd 0
        exit 3
    fi
elif [ "$MODE" = systemd ] && [ $SYSTEMD = 0 ]; then
    step systemd fail "mode systemd but this host does not run systemd; nothing was changed (use mode direct to run the agent without it)"
    state no_systemd 0
    exit 3
fi
if [ $SYSTEMD = 1 ]; then step systemd ok "systemd runs here; mode $MODE"; else step systemd ok "no systemd; mode direct"; fi

# ---------------------------------------------------------------- virtual environment + package
UPGRADE=0
if [ -x "$VENV/bin/python" ]; then
    UPGRADE=1
    step venv ok "$VENV exists; upgrading in place"
else
    mkdir -p "$(dirname "$VENV")" || fail venv "cannot create $(dirname "$VENV")"
    OUT=$("$PYTHON" -m venv "$VENV" 2>&1) || {
        rm -rf "$VENV"
        fail venv "$PYTHON -m venv failed (Debian/Ubuntu need the python3-venv package): $(printf '%s' "$OUT" | tail -n 3)"
    }
    step venv ok "created $VENV"
fi

PIPLOG=$(mktemp) || fail pip "mktemp failed"
PIP="$VENV/bin/python -m pip --disable-pip-version-check --no-input"
if [ $UPGRADE = 1 ]; then
    # --upgrade brings new dependencies; the second run replaces the package even at the same version.
    $PIP install --upgrade "$WHEEL[agent]" >"$PIPLOG" 2>&1 &&
        $PIP install --no-deps --force-reinstall "$WHEEL" >>"$PIPLOG" 2>&1
else
    $PIP install "$WHEEL[agent]" >"$PIPLOG" 2>&1
fi || { DETAIL=$(tail_of "$PIPLOG" 5); rm -f "$PIPLOG"; fail pip "pip install failed: $DETAIL"; }
rm -f "$PIPLOG"
VERSION=$("$AGENT_BIN" --version 2>&1) || fail pip "$AGENT_BIN does not run: $VERSION"
step pip ok "$VERSION"

# ---------------------------------------------------------------- configuration (0600, dir 0700)
mkdir -p "$STATE_DIR" && chmod 700 "$STATE_DIR" || fail config "cannot create $STATE_DIR"
TRUST_LINES="identity_key_file = \"$IDENTITY_KEY\"
trusted_keys = $KEYS_TOML"
[ -n "$CA_PEM" ] && TRUST_LINES="$TRUST_LINES
ca_file = \"$CA_FILE\""
write_config "host_id = \"$HOST_ID\"" "gateway_urls = $URLS_TOML" || fail config "cannot write $CONF"
if [ -n "$CA_PEM" ]; then
    install_ca "$CA_PEM" || fail config "cannot write $CA_FILE"
    step config ok "$CONF, CA $CA_FILE"
else
    step config ok "$CONF"
fi

# ---------------------------------------------------------------- the agent's own key, the token's hash
KEYGEN_ERROR=
make_identity || fail identity "warlock-agent keygen failed: $(printf '%s' "$KEYGEN_ERROR" | tail -n 3)"
step identity ok "$IDENTITY_KEY ($AGENT_PUBLIC_KEY)"
report_token
step token ok "sha256 $TOKEN_SHA256 ($TOKEN_FROM)"
if [ -n "${WARLOCK_API_URL:-}" ]; then
    enroll || fail enroll "POST ${WARLOCK_API_URL%/}/agent/enroll failed: $ENROLL_OUT"
    step enroll ok "public key enrolled with the API"
fi

# ---------------------------------------------------------------- start (systemd)
if [ "$MODE" = systemd ]; then
    stop_direct && step stop ok "stopped the agent that ran without systemd"
    mkdir -p "$(dirname "$UNIT")" || fail unit "cannot create $(dirname "$UNIT")"
    UNIT_TMP="$UNIT.tmp.$$"
    # The hardening keeps only what does not stop the agent managing the host (its commands must behave
    # as they would over SSH as root):
    #  - NoNewPrivileges: setuid binaries run by commands gain nothing (the agent is root already).
    #  - ProtectControlGroups: services are managed through systemctl (PID 1), not by writing cgroupfs.
    #  - LockPersonality, RestrictRealtime: nothing an admin command needs.
    #  - Not set, each because it would break ordinary host management: ProtectSystem (read-only /usr and
    #    /etc: no package installs, no config edits), PrivateTmp (commands would see another /tmp),
    #    ProtectHome (/root, /home), ProtectKernelTunables (sysctl), ProtectKernelModules (modprobe),
    #    UMask=0077 (files that commands create would differ from SSH's 0022). The agent's own files get
    #    their modes explicitly (config 0600, directories 0700).
    cat >"$UNIT_TMP" <<EOF_UNIT
[Unit]
Description=Warlock agent (dials out to the Warlock gateways)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart=${AGENT_BIN} run --config ${CONF}
Restart=on-failure
RestartSec=5
NoNewPrivileges=yes
ProtectControlGroups=yes
LockPersonality=yes
RestrictRealtime=yes

[Install]
WantedBy=multi-user.target
EOF_UNIT
    chmod 644 "$UNIT_TMP" && mv -f "$UNIT_TMP" "$UNIT" || fail unit "cannot write $UNIT"
    step unit ok "$UNIT"
    if command -v systemd-analyze >/dev/null 2>&1; then
        if OUT=$(systemd-analyze verify "$UNIT" 2>&1); then
            step verify ok "systemd-analyze verify"
        else
            step verify fail "systemd-analyze verify (not fatal): $(printf '%s' "$OUT" | tail -n 3)"
        fi
    fi
    if [ -n "$ROOT" ]; then
        OUT=$(systemctl link "$UNIT" 2>&1) || fail enable "systemctl link: $OUT"
    fi
    OUT=$(systemctl daemon-reload 2>&1) || fail enable "systemctl daemon-reload: $OUT"
    OUT=$(systemctl enable "$UNIT_NAME" 2>&1) || fail enable "systemctl enable: $OUT"
    step enable ok "$UNIT_NAME enabled"
    # restart also starts a stopped unit; an upgrade must restart to load the new code and config
    OUT=$(systemctl restart "$UNIT_NAME" 2>&1) || fail start "systemctl restart: $OUT"
    sleep 1
    unit_active || fail start "$UNIT_NAME is not active: $(systemctl status --no-pager -n 5 "$UNIT_NAME" 2>&1 | tail -n 5)"
    step start ok "$UNIT_NAME active"
    state running 1
    exit 0
fi

# ---------------------------------------------------------------- start (direct, no systemd)
if unit_installed; then # switching from systemd to direct: the unit must not start a second agent
    if has_systemd; then systemctl disable --now "$UNIT_NAME" >/dev/null 2>&1; fi
    rm -f "$UNIT"
    step stop ok "stopped, disabled and removed $UNIT_NAME"
fi
stop_direct && step stop ok "stopped the previous agent"
STARTED_PID=
start_direct || fail start "the agent exited at once: $(tail_of "$LOG" 5)"
step start ok "pid $STARTED_PID, log $LOG"
state running 0
exit 0
