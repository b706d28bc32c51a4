if [ "$1" -eq 0 ]; then
    if [ -e /etc/interlock/interlock.toml ]; then
        interlock detach --config /etc/interlock/interlock.toml >/dev/null 2>&1 || true
    fi
    systemctl stop interlock >/dev/null 2>&1 || true
    systemctl disable interlock >/dev/null 2>&1 || true
    interlock ca uninstall >/dev/null 2>&1 || true
fi
