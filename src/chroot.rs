//! chroot
