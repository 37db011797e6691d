# etask %post ($1 = 1 install, 2 upgrade): state/run roots, reload systemd; nothing starts on
# install (write the config first); on upgrade the etask services that run are restarted.
chgrp etask /etc/etask/etask.toml 2>/dev/null || :
# Signed dispatches are on in the shipped config: make the pair it names, once (a host that
# already has either file keeps it). The private key is the scheduler's (user etask) only.
if [ ! -e /etc/etask/dispatch.key ] && [ ! -e /etc/etask/dispatch.pub ]; then
    /usr/bin/etask keygen --out /etc/etask >/dev/null && chown etask:etask /etc/etask/dispatch.key || :
fi
systemd-tmpfiles --create etask.conf >/dev/null 2>&1 || :
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
    if [ "$1" -ge 2 ]; then
        systemctl try-restart 'etask-scheduler.service' 'etask-executor.service' 'etask-agent@*.service' || :
    fi
fi
