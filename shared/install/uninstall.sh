#!/bin/sh
# Warlock agent uninstaller: stop the agent (systemd unit or direct process) and remove everything the
# installer put under WARLOCK_PREFIX (default /). A host that is already clean is not an error.
# Prints `STEP <name> ok|fail <detail>` lines and `STATE removed|not_installed systemd=<0|1>`.
# Exit codes: 0 removed or not installed; 1 a step failed (no STATE line); 2 bad input.

# @include common.sh

FOUND=0
SYSTEMD=0
has_systemd && SYSTEMD=1

if [ $SYSTEMD = 1 ] && unit_installed; then
    FOUND=1
    systemctl disable --now "$UNIT_NAME" >/dev/null 2>&1
    if unit_active; then fail stop "$UNIT_NAME is still active"; fi
    step stop ok "stopped and disabled $UNIT_NAME"
fi
if [ -e "$UNIT" ]; then
    FOUND=1
    rm -f "$UNIT" || fail files "cannot remove $UNIT"
    [ $SYSTEMD = 1 ] && systemctl daemon-reload >/dev/null 2>&1
    step unit ok "removed $UNIT"
fi
if [ -f "$PIDFILE" ]; then
    FOUND=1
    if stop_direct; then step stop ok "stopped the agent process"; else step stop ok "no agent process was running"; fi
fi

REMOVED=
for path in "$VENV" "$CONF_DIR" "$STATE_DIR" "$LOG"; do
    if [ -e "$path" ]; then
        FOUND=1
        rm -rf -- "$path" || fail files "cannot remove $path"
        REMOVED="$REMOVED${REMOVED:+ }$path"
    fi
done
[ -n "$REMOVED" ] && step files ok "removed $REMOVED"

if [ $FOUND = 0 ]; then
    step files ok "nothing to remove under $PREFIX"
    state not_installed $SYSTEMD
else
    state removed $SYSTEMD
fi
exit 0
