# etask %preun ($1 = 0 removal, 1 upgrade): stop every etask service on removal only.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl stop 'etask-agent@*.service' etask-executor.service etask-scheduler.service || :
fi
