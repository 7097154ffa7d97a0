# stemforge: stages/93-role-k8s-node, in the image's chroot.
# The directories a node's kubelet and its join use, root's and closed.
install -d -m 0755 -o root -g root /etc/kubernetes /etc/kubernetes/manifests /var/lib/kubelet
install -d -m 0755 -o root -g root /etc/kubernetes/pki
install -d -m 0700 -o root -g root /var/lib/kubelet/pki
