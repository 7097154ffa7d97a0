# stemforge: stages/90-system. Runs inside the tree (set -eu).

# Accounts whose password expired are disabled 35 days later.
useradd -D -f 35
grep -qx 'INACTIVE=35' /etc/default/useradd

# New files of login users: group-readable at most.
if grep -qE '^UMASK[[:space:]]' /etc/login.defs; then
    sed -i -E 's/^UMASK[[:space:]].*/UMASK\t\t027/' /etc/login.defs
else
    printf 'UMASK\t\t027\n' >> /etc/login.defs
fi

# The persistent journal's directory, as systemd-journald would make it.
mkdir -p /var/log/journal
