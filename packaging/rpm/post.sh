systemctl daemon-reload >/dev/null 2>&1 || true
if [ "$1" -gt 1 ] && systemctl is-active --quiet interlock 2>/dev/null; then
    systemctl restart interlock
elif [ ! -e /etc/interlock/interlock.toml ]; then
    echo "interlock: not started. Write /etc/interlock/interlock.toml (example: /usr/share/interlock/interlock.toml.example),"
    echo "interlock: check it with 'interlock policy check /etc/interlock/interlock.toml', then 'systemctl enable --now interlock'."
fi
