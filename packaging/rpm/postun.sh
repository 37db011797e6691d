# etask %postun ($1 = 0 removal, 1 upgrade): reload systemd. RPM has no purge: the state in
# /var/lib/etask stays after removal (delete it by hand), like most RPM services.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
fi
