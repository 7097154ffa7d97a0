# stemforge: stages/92-role-postgres, in the image's chroot.
# Every cluster the package created gets the hardening drop-in and the
# client authentication rules, owned by postgres and private to it.
found=
for dir in /etc/postgresql/*/*; do
	[ -f "$dir/postgresql.conf" ] || continue
	found=1
	mkdir -p "$dir/conf.d"
	install -m 0640 -o postgres -g postgres /etc/postgresql-common/stemforge/50-stemforge.conf "$dir/conf.d/50-stemforge.conf"
	install -m 0640 -o postgres -g postgres /etc/postgresql-common/stemforge/pg_hba.conf "$dir/pg_hba.conf"
	chown postgres:postgres "$dir" "$dir"/*.conf
	chmod 0750 "$dir"
	chmod 0640 "$dir"/*.conf
done
[ -n "$found" ] || { echo "no PostgreSQL cluster was created" >&2; exit 1; }
# The package made a snakeoil key pair at install time: an image ships
# no private key. The server uses its own, made at first boot.
rm -f /etc/ssl/private/ssl-cert-snakeoil.key /etc/ssl/certs/ssl-cert-snakeoil.pem
install -d -m 0700 -o postgres -g postgres /etc/postgresql-common/tls
# The server account runs the server, not login sessions: administrators
# use `sudo -u postgres psql` or `runuser -u postgres -- psql`.
usermod --shell /usr/sbin/nologin postgres
