# etask %pre: create the etask user before the files land, so /etc/etask/etask.toml gets its
# group (the same line as /usr/lib/sysusers.d/etask.conf, which is not installed yet).
if command -v systemd-sysusers >/dev/null 2>&1; then
    echo 'u etask - "ETask scheduler" /var/lib/etask' | systemd-sysusers --replace=/usr/lib/sysusers.d/etask.conf - || :
elif ! getent passwd etask >/dev/null; then
    useradd -r -M -d /var/lib/etask -s /sbin/nologin -c "ETask scheduler" etask || :
fi
