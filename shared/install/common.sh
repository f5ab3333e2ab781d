# --- common.sh: shared by install.sh, configure.sh and uninstall.sh (inlined by shared.install.script) ---
# Output protocol, one line each on stdout:  STEP <name> ok|fail <detail>   and at the end
# STATE <running|stopped|removed|not_installed|no_systemd> systemd=<0|1>.
# The token is made on the host (push: WARLOCK_MAKE_TOKEN=1) or read from stdin / WARLOCK_TOKEN (pull) by
# the `read` builtin, and written by the `printf` builtin: it never becomes an argument of another
# process and is never printed; only its SHA-256 is (`TOKEN_SHA256 <hex>`), with the agent's public key
# (`AGENT_PUBLIC_KEY ed25519:...`), made on the host by `warlock-agent keygen`.
set -u
umask 077
export LC_ALL=C

PREFIX=${WARLOCK_PREFIX:-/}
case $PREFIX in
    /*) ;;
    *) echo "STEP inputs fail WARLOCK_PREFIX must be an absolute path"; exit 2 ;;
esac
case $PREFIX in
    *[!A-Za-z0-9_./-]*) echo "STEP inputs fail WARLOCK_PREFIX has characters outside [A-Za-z0-9_./-]"; exit 2 ;;
esac
ROOT=$(printf '%s' "$PREFIX" | sed 's:/*$::')   # "/" -> "", "/tmp/p/" -> "/tmp/p"
VENV="$ROOT/opt/warlock-agent"
AGENT_BIN="$VENV/bin/warlock-agent"
CONF_DIR="$ROOT/etc/warlock"
CONF="$CONF_DIR/agent.conf"
IDENTITY_KEY="$CONF_DIR/agent.key"
CA_FILE="$CONF_DIR/ca.pem"
STATE_DIR="$ROOT/var/lib/warlock-agent"
LEDGER="$STATE_DIR/ledger.jsonl"
PIDFILE="$STATE_DIR/agent.pid"
LOG="$ROOT/var/log/warlock-agent.log"
UNIT_NAME=warlock-agent.service
UNIT="$ROOT/etc/systemd/system/$UNIT_NAME"

step() { # step <name> ok|fail <detail...>
    _name=$1 _ok=$2
    shift 2
    printf 'STEP %s %s %s\n' "$_name" "$_ok" "$(printf '%s' "$*" | tr '\n\r\t' '   ' | cut -c1-1000)"
}

state() { # state <state> <0|1>
    printf 'STATE %s systemd=%s\n' "$1" "$2"
}

fail() { # fail <step> <detail...>: report the failed step and exit 1 (no STATE line: the run failed)
    _name=$1
    shift
    step "$_name" fail "$@"
    exit 1
}

tail_of() { # the last lines of a file, on one line
    tail -n "${2:-5}" "$1" 2>/dev/null | tr '\n' ' ' | cut -c1-800
}

short_sleep() { sleep 0.2 2>/dev/null || sleep 1; }

has_systemd() { # the host runs systemd as init and systemctl is there
    [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

is_agent() { # is_agent <pid>: a live (not zombie) process running this prefix's agent
    [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF "$AGENT_BIN run"
}

read_token() { # TOKEN from WARLOCK_TOKEN, else the first line of stdin (a tty gets a silent prompt)
    TOKEN=${WARLOCK_TOKEN:-}
    if [ -z "$TOKEN" ]; then
        if [ -t 0 ]; then
            printf 'agent token: ' >&2
            stty -echo 2>/dev/null
            IFS= read -r TOKEN || TOKEN=
            stty echo 2>/dev/null
            printf '\n' >&2
        else
            IFS= read -r TOKEN || true
        fi
    fi
    unset WARLOCK_TOKEN
    TOKEN=$(printf '%s' "$TOKEN" | tr -d '\r')  # printf is a builtin: the token is in no argv
    case $TOKEN in
        *[!0-9a-f]*) return 1 ;;
    esac
    [ ${#TOKEN} -eq 64 ]
}

make_token() { # TOKEN: 32 random bytes from the kernel, as 64 hex characters (in no argv, never printed)
    TOKEN=
    if [ -r /dev/urandom ] && command -v od >/dev/null 2>&1; then
        TOKEN=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
    fi
    case $TOKEN in *[!0-9a-f]*) TOKEN= ;; esac
    if [ ${#TOKEN} -ne 64 ]; then
        TOKEN=$("${PYTHON:-python3}" -c 'import secrets; print(secrets.token_hex(32))') || return 1
    fi
    case $TOKEN in *[!0-9a-f]*) return 1 ;; esac
    [ ${#TOKEN} -eq 64 ]
}

sha256_stdin() { # the SHA-256 hex digest of stdin
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum | cut -d' ' -f1
    elif command -v openssl >/dev/null 2>&1; then
        openssl dgst -sha256 | sed 's/^.* //'
    else
        "${PYTHON:-python3}" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
    fi
}

report_token() { # print the token's SHA-256 (the API stores only that), never the token
    TOKEN_SHA256=$(printf '%s' "$TOKEN" | sha256_stdin)
    printf 'TOKEN_SHA256 %s\n' "$TOKEN_SHA256"
}

trusted_toml() { # comma-separated ed25519:... keys -> TOML array in KEYS_TOML; 1 if one is not a key
    KEYS_TOML=
    _rest=$1,
    while [ -n "$_rest" ]; do
        _key=${_rest%%,*}
        _rest=${_rest#*,}
        [ -z "$_key" ] && continue
        case $_key in ed25519:*) ;; *) return 1 ;; esac
        _b64=${_key#ed25519:}
        case $_b64 in *[!A-Za-z0-9_-]*) return 1 ;; esac
        [ ${#_b64} -eq 43 ] || return 1
        KEYS_TOML="$KEYS_TOML${KEYS_TOML:+, }\"$_key\""
    done
    [ -n "$KEYS_TOML" ] && KEYS_TOML="[$KEYS_TOML]"
}

install_ca() { # install_ca <pem file>: copy a CA certificate next to the config (0600)
    grep -q -- '-----BEGIN CERTIFICATE-----' "$1" 2>/dev/null || return 1
    _tmp="$CONF_DIR/.ca.pem.$$"
    cp "$1" "$_tmp" && chmod 600 "$_tmp" && mv -f "$_tmp" "$CA_FILE"
}

make_identity() { # the agent's own Ed25519 key (made once, kept on upgrades); AGENT_PUBLIC_KEY line
    _out=$("$AGENT_BIN" keygen --config "$CONF" 2>&1) || { KEYGEN_ERROR=$_out; return 1; }
    AGENT_PUBLIC_KEY=$(printf '%s\n' "$_out" | grep -E '^ed25519:[A-Za-z0-9_-]{43}$' | tail -n 1)
    [ -n "$AGENT_PUBLIC_KEY" ] || { KEYGEN_ERROR="keygen printed no ed25519:... key: $_out"; return 1; }
    printf 'AGENT_PUBLIC_KEY %s\n' "$AGENT_PUBLIC_KEY"
}

check_host_id() {
    case $1 in
        '' | *[!a-z0-9_-]*) return 1 ;;
    esac
    [ ${#1} -le 63 ]
}

urls_toml() { # comma-separated ws(s):// URLs -> TOML array in URLS_TOML; 1 if one is not acceptable
    URLS_TOML=
    _rest=$1,
    while [ -n "$_rest" ]; do
        _url=${_rest%%,*}
        _rest=${_rest#*,}
        [ -z "$_url" ] && continue
        case $_url in
            ws://?* | wss://?*) ;;
            *) return 1 ;;
        esac
        case $_url in
            *[\"\\[:space:][:cntrl:]]*) return 1 ;; # would need escaping in TOML: refuse
        esac
        URLS_TOML="$URLS_TOML${URLS_TOML:+, }\"$_url\""
    done
    [ -n "$URLS_TOML" ] && URLS_TOML="[$URLS_TOML]"
}

write_config() { # write_config <host_id line> <gateway_urls line> [<file with extra lines>]; + TRUST_LINES
    mkdir -p "$CONF_DIR" && chmod 700 "$CONF_DIR" || return 1
    _tmp="$CONF_DIR/.agent.conf.$$"
    rm -f "$_tmp"
    (umask 077 && : >"$_tmp") && chmod 600 "$_tmp" || return 1  # 0600 before the token is in it
    {
        printf '# Warlock agent configuration (written by the Warlock installer). Holds the token: keep 0600.\n'
        printf '%s\n' "$1"
        printf 'token = "%s"\n' "$TOKEN"
        printf '%s\n' "$2"
        [ -n "${TRUST_LINES:-}" ] && printf '%s\n' "$TRUST_LINES"
        if [ -n "${3:-}" ] && [ -f "$3" ]; then
            cat "$3"
        else
            printf 'ledger_path = "%s"\n' "$LEDGER"
        fi
    } >>"$_tmp" || { rm -f "$_tmp"; return 1; }
    mv -f "$_tmp" "$CONF"
}

stop_direct() { # stop the agent started without systemd (pid file); 0 if one was running
    [ -f "$PIDFILE" ] || return 1
    _pid=$(cat "$PIDFILE" 2>/dev/null)
    rm -f "$PIDFILE"
    case $_pid in '' | *[!0-9]*) return 1 ;; esac
    is_agent "$_pid" || return 1
    kill -TERM "$_pid" 2>/dev/null
    _i=0
    while is_agent "$_pid" && [ $_i -lt 50 ]; do
        short_sleep
        _i=$((_i + 1))
    done
    is_agent "$_pid" && kill -KILL "$_pid" 2>/dev/null
    return 0
}

start_direct() { # start the agent without systemd, detached, and check it is still alive after ~1 s
    mkdir -p "$STATE_DIR" "$(dirname "$LOG")" || return 1
    nohup setsid "$AGENT_BIN" run --config "$CONF" >>"$LOG" 2>&1 </dev/null &
    _pid=$!
    printf '%s\n' "$_pid" >"$PIDFILE"
    _i=0
    while [ $_i -lt 5 ]; do
        short_sleep
        _i=$((_i + 1))
    done
    if is_agent "$_pid"; then
        STARTED_PID=$_pid
        return 0
    fi
    rm -f "$PIDFILE"
    return 1
}

unit_active() { has_systemd && systemctl is-active --quiet "$UNIT_NAME" 2>/dev/null; }

unit_installed() { # this prefix's unit file exists (or, for prefix /, systemd knows the unit)
    [ -e "$UNIT" ] && return 0
    [ -z "$ROOT" ] && has_systemd && systemctl cat "$UNIT_NAME" >/dev/null 2>&1
}
# --- end of common.sh ---
