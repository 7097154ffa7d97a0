# stemforge: stages/91-role-docker, in the image's chroot.
# The account userns-remap maps container root to: created here with no
# shell and no home (dockerd would otherwise add it at first start,
# outside any build record), with 65536 subordinate ids.
if ! getent passwd dockremap >/dev/null; then
	useradd --system --user-group --no-create-home --home-dir /nonexistent \
		--shell /usr/sbin/nologin dockremap
fi
grep -q '^dockremap:' /etc/subuid 2>/dev/null || echo 'dockremap:100000:65536' >>/etc/subuid
grep -q '^dockremap:' /etc/subgid 2>/dev/null || echo 'dockremap:100000:65536' >>/etc/subgid
chmod 0644 /etc/subuid /etc/subgid
# The Docker socket's group exists and holds nobody: membership is root.
getent group docker >/dev/null || groupadd --system docker
gpasswd --members '' docker
